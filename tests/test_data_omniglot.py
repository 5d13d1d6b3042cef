"""Omniglot loader, multi-shot tasks (WarpGrad App. E) and the Vinyals few-shot split."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from warpopt.data import (ClassificationTask, EpisodeSampler, load_omniglot, multishot_split,
                          random_affine, vinyals_split)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"
needs_shared = pytest.mark.skipif(
    not (SHARED / "images_background.npz").is_file(),
    reason=f"shared Omniglot npz not found at {SHARED.resolve()} (../shared/data/omniglot from the repo root)",
)

# Tiny synthetic dataset: (set, alphabet, n_characters); alphabet names deliberately
# not in sorted order within a set, to check that loading sorts them.
TINY = [("images_background", "Beta", 3), ("images_background", "Alpha", 3), ("images_evaluation", "Gamma", 2)]
SIDE = 105


def _drawing(uid: int) -> np.ndarray:
    """Binary 105x105 image (True = white) whose ink pixel count is ``uid``."""
    img = np.ones(SIDE * SIDE, dtype=bool)
    img[:uid] = False
    return img.reshape(SIDE, SIDE)


def _expected_uids() -> list[list[int]]:
    """uids per character in the canonical order (sets, then sorted alphabets)."""
    order = []
    for s in ("images_background", "images_evaluation"):
        for _, alpha, n in sorted((t for t in TINY if t[0] == s), key=lambda t: t[1]):
            order += [(alpha, k) for k in range(n)]
    return [[_uid(a, k, d) for d in range(20)] for a, k in order]


def _uid(alpha: str, k: int, d: int) -> int:
    return 1 + ["Alpha", "Beta", "Gamma"].index(alpha) * 60 + k * 20 + d


@pytest.fixture()
def tiny_folder(tmp_path: Path) -> Path:
    """Original layout: images_*/<Alphabet>/characterNN/<id>_<dd>.png (1-bit PNGs)."""
    char_id = 0
    for s, alpha, n in TINY:
        for k in range(n):
            char_id += 1
            d = tmp_path / s / alpha / f"character{k + 1:02d}"
            d.mkdir(parents=True)
            drawings = list(range(20))
            random.Random(k).shuffle(drawings)  # write in scrambled order
            for j in drawings:
                Image.fromarray(_drawing(_uid(alpha, k, j))).save(d / f"{char_id:04d}_{j + 1:02d}.png")
    return tmp_path


@pytest.fixture()
def tiny_npz(tmp_path: Path) -> Path:
    """The same dataset in npz form, rows in alphabets.tsv (unsorted) order."""
    rows, first = [], 1
    for s in ("images_background", "images_evaluation"):
        arrays = []
        for _, alpha, n in (t for t in TINY if t[0] == s):
            rows.append([s, alpha, first, first + n - 1, n])
            first += n
            arrays += [np.stack([_drawing(_uid(alpha, k, j)) for j in range(20)]) for k in range(n)]
        np.savez_compressed(tmp_path / f"{s}.npz", images=np.stack(arrays),
                            labels=np.repeat(np.arange(len(arrays))[:, None], 20, 1))
    with open(tmp_path / "alphabets.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["set", "alphabet", "first_char_id", "last_char_id", "n_chars"])
        w.writerows(rows)
    return tmp_path


@pytest.mark.parametrize("layout", ["tiny_folder", "tiny_npz"])
def test_tiny_layouts_order_and_polarity(layout: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(layout)
    om = load_omniglot(root, image_size=SIDE)
    assert om.alphabets == ["Alpha", "Beta", "Gamma"]
    assert om.characters == [("Alpha", 0), ("Alpha", 1), ("Alpha", 2), ("Beta", 0), ("Beta", 1),
                             ("Beta", 2), ("Gamma", 0), ("Gamma", 1)]
    assert om.alphabet_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert om.character_names[3] == "Beta/character01"
    assert om.images.shape == (8, 20, 1, SIDE, SIDE) and om.images.dtype == torch.float32
    # ink = 1, background = 0; drawings in drawer (file-name) order
    assert set(om.images.unique().tolist()) == {0.0, 1.0}
    assert om.images.sum(dim=(2, 3, 4)).long().tolist() == _expected_uids()


def test_resized_layouts_agree(tiny_folder: Path, tiny_npz: Path, tmp_path: Path) -> None:
    a = load_omniglot(tiny_folder, image_size=28)
    b = load_omniglot(tiny_npz, image_size=28)
    assert a.images.shape == (8, 20, 1, 28, 28)
    assert torch.equal(a.images, b.images) and a.characters == b.characters
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0
    assert a.images[..., -1, -1].abs().max() == 0  # far corner is background -> 0
    near = load_omniglot(tiny_folder, image_size=28, resample="nearest")
    assert set(near.images.unique().tolist()) <= {0.0, 1.0}
    # cache round trip
    c1 = load_omniglot(tiny_npz, image_size=28, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    c2 = load_omniglot(tiny_npz, image_size=28, cache_dir=tmp_path / "cache")
    assert torch.equal(c1.images, b.images) and torch.equal(c2.images, b.images)


def test_missing_and_malformed(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_omniglot(tmp_path / "nowhere")
    msg = str(e.value)
    assert "images_background.npz" in msg and "characterNN" in msg and "nowhere" in msg
    bad = tiny_folder / "images_background" / "Alpha" / "character02" / "0005_03.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="0005_03.png"):
        load_omniglot(tiny_folder)


def test_malformed_npz(tiny_npz: Path) -> None:
    np.savez(tiny_npz / "images_evaluation.npz", pictures=np.zeros(3))
    with pytest.raises(ValueError, match="images_evaluation.npz"):
        load_omniglot(tiny_npz)
    (tiny_npz / "alphabets.tsv").write_text("nonsense\n1\n")
    with pytest.raises(ValueError, match="alphabets.tsv"):
        load_omniglot(tiny_npz)


def test_multishot_tiny(tiny_folder: Path) -> None:
    om = load_omniglot(tiny_folder, image_size=SIDE)
    train, test = multishot_split(om, seed=3, num_pretrain=1, num_test=1, classes=3)
    assert {t.name for t in train + test} == {"Alpha", "Beta"}  # Gamma has 2 < 3 characters
    task = next(t for t in train + test if t.name == "Beta")
    assert task.train_images.shape == (45, 1, SIDE, SIDE) and task.test_images.shape == (15, 1, SIDE, SIDE)
    uids = task.test_images.sum(dim=(1, 2, 3)).long().view(3, 5)
    assert uids.tolist() == [[_uid("Beta", k, d) for d in range(15, 20)] for k in range(3)]  # last 5 held out
    first = multishot_split(om, 3, 1, 1, classes=3, holdout="first")
    task = next(t for t in first[0] + first[1] if t.name == "Beta")
    assert task.test_images.sum(dim=(1, 2, 3)).long()[:5].tolist() == [_uid("Beta", 0, d) for d in range(5)]
    with pytest.raises(ValueError):
        multishot_split(om, 0, num_pretrain=2, num_test=1, classes=3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_task_on_device(tiny_folder: Path, device: str) -> None:
    om = load_omniglot(tiny_folder, image_size=28).to(device)
    train, _ = multishot_split(om, seed=0, num_pretrain=1, num_test=1, classes=3)
    task = train[0]
    assert task.train_images.device.type == device
    x, y = task.sample(16, torch.Generator().manual_seed(3))
    assert x.device.type == device and y.device.type == device
    xc, yc = task.to("cpu").sample(16, torch.Generator().manual_seed(3))
    assert torch.equal(y.cpu(), yc) and torch.allclose(x.cpu(), xc, atol=1e-4)  # same draw on any device


@pytest.fixture(scope="module")
def omniglot():
    if not (SHARED / "images_background.npz").is_file():
        pytest.skip(f"shared Omniglot npz not found at {SHARED.resolve()}")
    return load_omniglot(SHARED, image_size=28)


@needs_shared
def test_shared_npz(omniglot) -> None:
    om = omniglot
    assert om.images.shape == (1623, 20, 1, 28, 28) and om.images.dtype == torch.float32
    assert len(om.alphabets) == 50 and len(om.characters) == 1623
    assert om.alphabets[:30] == sorted(om.alphabets[:30]) and om.alphabets[30:] == sorted(om.alphabets[30:])
    assert "Latin" in om.alphabets[:30] and "ULOG" in om.alphabets[30:]
    with open(SHARED / "alphabets.tsv") as f:
        counts = {r["alphabet"]: int(r["n_chars"]) for r in csv.DictReader(f, delimiter="\t")}
    assert {a: len(om.characters_of(a)) for a in om.alphabets} == counts
    assert om.images.mean() < 0.2  # ink is the minority -> ink = 1
    assert om.images[:, :, :, 0, 0].max() < 0.05 and om.images.amax(dim=(2, 3, 4)).min() > 0.5


@needs_shared
def test_multishot_protocol(omniglot) -> None:
    train, test = multishot_split(omniglot, seed=0, num_pretrain=36)
    names_tr, names_te = [t.name for t in train], [t.name for t in test]
    assert len(train) == 36 and len(test) == 10 and not set(names_tr) & set(names_te)
    assert len(set(names_tr) | set(names_te)) == 46
    assert not {"Blackfoot_(Canadian_Aboriginal_Syllabics)", "Tagalog"} & set(names_tr + names_te)
    again = multishot_split(omniglot, seed=0, num_pretrain=25)
    assert [t.name for t in again[1]] == names_te and [t.name for t in again[0]] == names_tr[:25]
    other = multishot_split(omniglot, seed=1, num_pretrain=36)
    assert [t.name for t in other[1]] != names_te
    for t in train[:3] + test[:3]:
        assert t.train_images.shape == (300, 1, 28, 28) and t.test_images.shape == (100, 1, 28, 28)
        assert torch.bincount(t.train_labels).tolist() == [15] * 20
        assert torch.bincount(t.test_labels).tolist() == [5] * 20
    t = test[0]
    rows = omniglot.characters_of(t.name)[:20]
    assert torch.equal(t.test_images.view(20, 5, 1, 28, 28), omniglot.images[rows, 15:])


@needs_shared
def test_task_sampling(omniglot) -> None:
    task: ClassificationTask = multishot_split(omniglot, seed=0, num_pretrain=1)[0][0]
    x1, y1 = task.sample(128, torch.Generator().manual_seed(5))
    x2, y2 = task.sample(128, torch.Generator().manual_seed(5))
    assert x1.shape == (128, 1, 28, 28) and y1.shape == (128,) and y1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = task.sample(128, torch.Generator().manual_seed(6))
    assert not torch.equal(x1, x3)
    # un-augmented samples are exact training images, distinct within a batch
    xr, yr = task.sample(300, torch.Generator().manual_seed(5), augment=False)
    flat = xr.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == torch.unique(task.train_images.flatten(1), dim=0).shape[0]
    assert torch.bincount(yr, minlength=20).tolist() == [15] * 20
    big, _ = task.sample(1280, torch.Generator().manual_seed(0), augment=False)  # 10x baselines
    assert big.shape[0] == 1280
    # augmentation changes the training images
    g = torch.Generator().manual_seed(1)
    idx_only, _ = task.sample(64, torch.Generator().manual_seed(7), augment=False)
    aug, _ = task.sample(64, torch.Generator().manual_seed(7), augment=True)
    assert (aug - idx_only).abs().flatten(1).amax(1).min() > 0
    assert aug.min() >= -1e-6 and aug.max() <= 1 + 1e-6
    # test split is never augmented
    tx = torch.cat([x for x, _ in task.test_batches(32)])
    ty = torch.cat([y for _, y in task.test_batches(32)])
    assert torch.equal(tx, task.test_images) and torch.equal(ty, task.test_labels)
    it = task.loader(20, g)
    assert next(it)[0].shape == (20, 1, 28, 28)
    assert task.to("cpu").train_images.device.type == "cpu"


def test_random_affine_identity_and_seeding() -> None:
    x = torch.rand(4, 1, 12, 12)
    same = random_affine(x, torch.Generator().manual_seed(0), degrees=(0, 0), translate=(0, 0), scale=(1, 1))
    assert torch.allclose(same, x, atol=1e-5)
    rot = random_affine(x, None, degrees=(90, 90), translate=(0, 0), scale=(1, 1))
    assert torch.allclose(rot, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4)  # counter-clockwise
    a = random_affine(x, torch.Generator().manual_seed(1))
    b = random_affine(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@needs_shared
def test_vinyals_split(omniglot) -> None:
    pools = vinyals_split(omniglot)
    assert {k: p.num_classes for k, p in pools.items()} == {"train": 4112, "val": 688, "test": 1692}
    chars = {k: {n.rsplit("/", 1)[0] for n in p.class_names} for k, p in pools.items()}
    assert [len(chars[k]) for k in ("train", "val", "test")] == [1028, 172, 423]
    assert not (chars["train"] & chars["val"]) and not (chars["train"] | chars["val"]) & chars["test"]
    assert pools["test"].class_names[:2] == ["Gurmukhi/character42/rot000", "Gurmukhi/character42/rot090"]
    assert "Gurmukhi/character41/rot270" in pools["train"].class_names
    assert {n.split("/")[0] for n in pools["val"].class_names} == {
        "Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
    p = pools["val"]
    assert p.images_of(0).shape == (20, 1, 28, 28)
    assert torch.equal(p.images_of(1), torch.rot90(p.images_of(0), 1, dims=(-2, -1)))
    ep = EpisodeSampler(p, ways=5, shots=1, queries=15, seed=0).episode(0)
    assert ep.support_x.shape == (5, 1, 28, 28) and ep.query_x.shape == (75, 1, 28, 28)
