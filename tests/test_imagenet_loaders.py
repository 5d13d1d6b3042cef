"""miniImageNet / tieredImageNet loaders on tiny files in the real formats."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from warpopt.data import (EpisodeSampler, MiniImageNetCSV, MiniImageNetPickle, TieredImageNet,
                          load_miniimagenet, load_tieredimagenet)

N_CLASSES, PER_CLASS = 3, 6


def _images(n: int, seed: int = 0, size: int = 84) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _chw(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255


def _write_mini_pickle(root: Path, split: str = "train") -> tuple[np.ndarray, dict]:
    data = _images(N_CLASSES * PER_CLASS)
    rows = np.random.default_rng(1).permutation(len(data))
    names = ["n0300", "n0100", "n0200"]  # not sorted on purpose
    class_dict = {n: rows[i * PER_CLASS:(i + 1) * PER_CLASS].tolist() for i, n in enumerate(names)}
    with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
        pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    return data, class_dict


def test_mini_pickle(tmp_path: Path) -> None:
    data, class_dict = _write_mini_pickle(tmp_path)
    _write_mini_pickle(tmp_path, "validation")
    pool = load_miniimagenet(tmp_path, "train")
    assert isinstance(pool, MiniImageNetPickle)
    assert pool.num_classes == 3 and pool.class_names == ["n0100", "n0200", "n0300"]
    for c, name in enumerate(pool.class_names):
        x = pool.images_of(c)
        assert x.shape == (PER_CLASS, 3, 84, 84) and x.dtype == torch.float32
        assert torch.equal(x, _chw(data[class_dict[name]]))  # exact pixel round trip
        assert torch.equal(pool.images_at(c, [4, 1]), x[[4, 1]])
    assert isinstance(load_miniimagenet(tmp_path, "val"), MiniImageNetPickle)
    normed = load_miniimagenet(tmp_path, "train", normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert torch.allclose(normed.images_of(0), (pool.images_of(0) - 0.5) / 0.25)
    ep = EpisodeSampler(pool, ways=3, shots=2, queries=3, seed=0).episode(0)
    assert ep.support_x.shape == (6, 3, 84, 84) and ep.query_x.shape == (9, 3, 84, 84)


def test_mini_csv(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    lines, expected = ["filename,label"], {}
    for c, label in enumerate(["n02", "n01", "n03"]):
        for j in range(PER_CLASS):
            name = f"{label}{j:08d}.jpg"
            size = 100 if (c, j) == (2, 5) else 84  # one off-size image, resized on load
            Image.fromarray(_images(1, seed=10 * c + j, size=size)[0]).save(tmp_path / "images" / name, quality=95)
            lines.append(f"{name},{label}")
            expected.setdefault(label, []).append(tmp_path / "images" / name)
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    pool = load_miniimagenet(tmp_path, "test")
    assert isinstance(pool, MiniImageNetCSV)
    assert pool.num_classes == 3 and pool.class_names == ["n01", "n02", "n03"]
    assert [pool.size_of(c) for c in range(3)] == [PER_CLASS] * 3
    decoded = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in expected["n01"]])
    assert torch.equal(pool.images_at(0, [0, 3]), _chw(decoded[[0, 3]]))  # lazy, exact decode
    assert torch.equal(pool.images_of(0), _chw(decoded))
    x = pool.images_of(2)
    assert x.shape == (PER_CLASS, 3, 84, 84) and 0 <= x.min() and x.max() <= 1
    # malformed CSVs
    (tmp_path / "val.csv").write_text("file,class\na.jpg,n01\n")
    with pytest.raises(ValueError, match="val.csv"):
        load_miniimagenet(tmp_path, "val")
    (tmp_path / "train.csv").write_text("filename,label\nmissing.jpg,n01\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_miniimagenet(tmp_path, "train")


def test_mini_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_miniimagenet(tmp_path, "train")
    assert "mini-imagenet-cache-train.pkl" in str(e.value) and "train.csv" in str(e.value)
    bad = tmp_path / "mini-imagenet-cache-train.pkl"
    bad.write_bytes(b"\x80\x04garbage that is not a pickle")
    with pytest.raises(ValueError) as e:
        load_miniimagenet(tmp_path, "train")
    assert "mini-imagenet-cache-train.pkl" in str(e.value) and "image_data" in str(e.value)
    with open(bad, "wb") as f:
        pickle.dump({"images": np.zeros((2, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(ValueError, match="class_dict"):
        load_miniimagenet(tmp_path, "train")
    with open(bad, "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {"a": [0]}}, f)
    with pytest.raises(ValueError, match="image_data"):
        load_miniimagenet(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_miniimagenet(tmp_path, "training")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_tiered(root: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    data = _images(N_CLASSES * PER_CLASS, seed=3)
    labels = np.random.default_rng(4).permutation(np.repeat(np.arange(N_CLASSES), PER_CLASS))
    encoded = [_png(a) if i % 2 else np.frombuffer(_png(a), dtype=np.uint8) for i, a in enumerate(data)]
    with open(root / f"{split}_images_png.pkl", "wb") as f:
        pickle.dump(encoded, f)
    with open(root / f"{split}_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": labels, "label_general": labels // 2,
                     "label_specific_str": ["dog", "cat", "eel"], "label_general_str": ["mammal", "fish"]}, f)
    return data, labels


def test_tiered(tmp_path: Path) -> None:
    data, labels = _write_tiered(tmp_path, "val")
    pool = load_tieredimagenet(tmp_path, "val", cache_classes=1)
    assert isinstance(pool, TieredImageNet)
    assert pool.num_classes == 3 and pool.class_names == ["dog", "cat", "eel"]
    for c in range(3):
        assert pool.size_of(c) == PER_CLASS
        assert torch.equal(pool.images_at(c, [5, 0]), _chw(data[labels == c][[5, 0]]))
        assert torch.equal(pool.images_of(c), _chw(data[labels == c]))  # exact PNG round trip
        assert torch.equal(pool.images_of(c), pool.images_of(c))  # cached path
    ep = EpisodeSampler(pool, ways=2, shots=2, queries=2, seed=1).episode(3)
    assert ep.support_x.shape == (4, 3, 84, 84)


def test_tiered_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_labels.pkl"):
        load_tieredimagenet(tmp_path, "train")
    _write_tiered(tmp_path, "train")
    (tmp_path / "train_images_png.pkl").write_bytes(b"definitely not a pickle")
    with pytest.raises(ValueError, match="train_images_png.pkl"):
        load_tieredimagenet(tmp_path, "train")
    with open(tmp_path / "train_images_png.pkl", "wb") as f:
        pickle.dump([b"not a png"] * (N_CLASSES * PER_CLASS), f)
    pool = load_tieredimagenet(tmp_path, "train")
    with pytest.raises(ValueError, match="train_images_png.pkl"):
        pool.images_of(0)
    with open(tmp_path / "train_images_png.pkl", "wb") as f:
        pickle.dump([b"x"] * 2, f)
    with pytest.raises(ValueError, match="labels"):
        load_tieredimagenet(tmp_path, "train")
    with open(tmp_path / "train_labels.pkl", "wb") as f:
        pickle.dump({"label_general": [0, 1]}, f)
    with pytest.raises(ValueError, match="label_specific"):
        load_tieredimagenet(tmp_path, "train")
