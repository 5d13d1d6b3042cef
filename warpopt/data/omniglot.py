"""Omniglot (Lake et al., 2015): loader, multi-shot tasks and the Vinyals few-shot split.

:func:`load_omniglot` reads the npz form (``images_background.npz``,
``images_evaluation.npz``: bool or 0/1 integer ``(n_chars, 20, 105, 105)``, True/1 =
background; ``alphabets.tsv`` with disjoint, non-empty character-id ranges), the original
folder layout as unzipped or as torchvision saves it
(``images_background/<Alphabet>/characterNN/*.png``, ``images_evaluation/...``;
``root/omniglot-py/`` is also tried) or the official archives themselves, still zipped
(``images_background.zip``, ``images_evaluation.zip``; see :mod:`warpopt.data.download`).
All give the same :class:`Omniglot`:
background alphabets sorted by name, then evaluation alphabets sorted by name;
characters in character-number order; drawings in file-name (= drawer) order.
Images are resized once, up front, with PIL (LANCZOS on 8-bit grey by default,
the filter the original Leap/WarpGrad pre-processing asks for) and stored as
float32 in [0, 1] with ink = 1. PIL ignores the filter for 1-bit (mode "1")
images and uses nearest; the original resized the PNGs as opened, so if they
are 1-bit its 28x28 images were binary: ``resample="nearest"`` gives that.

Multi-shot protocol (:func:`multishot_split`; WarpGrad Appendix E, Flennerhag et
al. 2019): alphabets with < 20 characters dropped (46 remain), one 20-way task
per alphabet, 5 drawings per character held out as the task's test set, random
(not class-balanced) training batches with random affine augmentation; the
held-out test set is never augmented. Few-shot protocol (:func:`vinyals_split`):
the Vinyals et al. (2016) split of the prototypical-networks code, x4 rotations.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .episodes import ClassificationTask, TensorClassPool
from .transforms import pil_resize

__all__ = [
    "Omniglot",
    "load_omniglot",
    "ClassificationTask",
    "multishot_split",
    "OmniglotRotationPool",
    "vinyals_split",
    "VINYALS_VAL_ALPHABETS",
    "AUGMENTATION",
]

SETS = ("images_background", "images_evaluation")
#: Multi-shot training augmentation (Appendix E): rotation, translation, scale.
AUGMENTATION: dict = {"degrees": (0.0, 360.0), "translate": (0.2, 0.2), "scale": (0.8, 1.2)}
#: Alphabets of the Vinyals validation split (prototypical-networks ``val.txt``).
VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass
class Omniglot:
    """All Omniglot characters, resized.

    Attributes:
        alphabets: alphabet names (background set sorted, then evaluation sorted).
        characters: ``(alphabet, char_index)`` per character, ``char_index``
            0-based within the alphabet (folder ``character{char_index+1:02d}``
            for the full dataset).
        images: float32 ``(n_chars, n_drawings, 1, S, S)``, ink = 1, in [0, 1].
        alphabet_of: int64 ``(n_chars,)`` index into ``alphabets``.
        character_names: ``"<Alphabet>/<character folder>"`` per character.
    """

    alphabets: list[str]
    characters: list[tuple[str, int]]
    images: torch.Tensor
    alphabet_of: torch.Tensor
    character_names: list[str] = field(default_factory=list)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.characters)

    def characters_of(self, alphabet: str) -> list[int]:
        """Character rows of ``alphabet`` in character order."""
        a = self.alphabets.index(alphabet)
        return torch.nonzero(self.alphabet_of == a).flatten().tolist()

    def to(self, device: torch.device | str) -> Omniglot:
        """A copy with ``images`` and ``alphabet_of`` on ``device``."""
        return Omniglot(
            self.alphabets, self.characters, self.images.to(device), self.alphabet_of.to(device), self.character_names
        )


@dataclass
class _Listing:
    alphabets: list[str]
    alphabet_of: list[int]
    char_index: list[int]
    char_names: list[str]
    fingerprint: str  # identifies the source files (paths, sizes, times, array shapes and dtypes)
    n_drawings: int
    decode: Callable[[int, str], np.ndarray]  # (size, resample) -> uint8 (n, D, S, S), white bg


def _resize_block(block: np.ndarray, size: int, resample: str) -> np.ndarray:
    """uint8 or bool ``(n, D, H, W)`` (white background) -> uint8 ``(n, D, S, S)``."""
    n, d = block.shape[:2]
    out = np.empty((n, d, size, size), dtype=np.uint8)
    for i in range(n):
        u8 = block[i].astype(np.uint8) * np.uint8(255) if block.dtype == bool else block[i]
        for j in range(d):
            out[i, j] = pil_resize(u8[j], size, resample)
    return out


_NPZ_FMT = "an 'images' array (n_chars, n_drawings, H, W) of bool or 0/1 integers, True/1 = white background"
_TSV_FMT = "tab-separated columns set, alphabet, first_char_id, last_char_id, n_chars"


def _npz_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of ``images`` in the npz at ``path``, read without loading the array."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except KeyError as e:
        raise ValueError(f"{path}: npz has no 'images' array; expected {_NPZ_FMT}") from e
    except Exception as e:  # zipfile / format / OS errors
        raise ValueError(f"{path}: cannot read as npz ({e}); expected {_NPZ_FMT}") from e
    if len(shape) != 4 or not (dtype == np.bool_ or np.issubdtype(dtype, np.integer)):
        raise ValueError(f"{path}: 'images' is {dtype} {shape}; expected {_NPZ_FMT}")
    return shape, dtype


def _read_tsv(tsv: Path) -> list[dict[str, Any]]:
    """The rows of ``alphabets.tsv``, each with its columns (str) plus ``first``, ``last`` (int
    character ids) and ``line`` (its line number)."""
    try:
        with open(tsv, newline="") as f:
            rows: list[dict[str, Any]] = list(csv.DictReader(f, delimiter="\t"))
        need = {"set", "alphabet", "first_char_id", "last_char_id"}
        if not rows or not need <= set(rows[0]):
            raise ValueError(f"missing columns {sorted(need)}")
        for line, r in enumerate(rows, start=2):
            try:
                r["first"], r["last"] = int(r["first_char_id"]), int(r["last_char_id"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"line {line}: {e}") from None
            r["line"] = line
    except (ValueError, TypeError, KeyError, csv.Error) as e:
        raise ValueError(f"{tsv}: malformed alphabets.tsv (expected {_TSV_FMT}): {e}") from e
    for r in rows:
        where = f"{tsv}, line {r['line']} ({r['alphabet']!r})"
        if r["last"] < r["first"]:
            raise ValueError(
                f"{where}: empty character range {r['first']}..{r['last']}; "
                f"fix it so that first_char_id <= last_char_id"
            )
        if r.get("n_chars") not in (None, "") and r["n_chars"] != str(r["last"] - r["first"] + 1):
            raise ValueError(
                f"{where}: n_chars is {r['n_chars']} but the range {r['first']}..{r['last']} "
                f"holds {r['last'] - r['first'] + 1} characters; fix one of them"
            )
    return rows


def _list_npz(root: Path, sets: Sequence[str]) -> _Listing:
    tsv = root / "alphabets.tsv"
    rows = _read_tsv(tsv)
    alphabets: list[str] = []
    alphabet_of: list[int] = []
    char_index: list[int] = []
    names: list[str] = []
    files: list[Path] = []
    headers: list[tuple[tuple[int, ...], str]] = []
    plan: list[tuple[Path, list[tuple[int, int]]]] = []
    for s in sets:
        set_rows = sorted((r for r in rows if r["set"] == s), key=lambda r: r["alphabet"])
        if not set_rows:
            raise ValueError(f"{tsv}: no alphabets listed for set {s!r}")
        path = root / f"{s}.npz"
        shape, dtype = _npz_header(path)
        if headers and shape[1:] != headers[0][0][1:]:
            raise ValueError(
                f"{path}: 'images' is {shape} but {files[0]} is {headers[0][0]}: both sets "
                f"must have the same number of drawings per character and image size"
            )
        # Row i of the set's npz is the character with the set's smallest id + i.
        offset = min(r["first"] for r in set_rows)
        by_id = sorted(set_rows, key=lambda r: r["first"])
        for prev, r in pairwise(by_id):
            if r["first"] <= prev["last"]:
                raise ValueError(
                    f"{tsv}, lines {prev['line']} and {r['line']}: the character ranges of "
                    f"{prev['alphabet']!r} ({prev['first']}..{prev['last']}) and {r['alphabet']!r} "
                    f"({r['first']}..{r['last']}) overlap; each character id belongs to one alphabet"
                )
        top = by_id[-1]  # ranges are disjoint: the last one by first id ends highest
        if top["last"] - offset >= shape[0]:
            raise ValueError(
                f"{tsv}, line {top['line']} ({top['alphabet']!r}): character ids {top['first']}.."
                f"{top['last']} are out of range: {path} holds {shape[0]} characters (ids {offset}.."
                f"{offset + shape[0] - 1}); fix the range or use the matching npz"
            )
        ranges = []
        for r in set_rows:
            a = len(alphabets)
            alphabets.append(r["alphabet"])
            for k in range(r["last"] - r["first"] + 1):
                alphabet_of.append(a)
                char_index.append(k)
                names.append(f"{r['alphabet']}/character{k + 1:02d}")
            ranges.append((r["first"] - offset, r["last"] - offset + 1))
        files.append(path)
        headers.append((shape, str(dtype)))
        plan.append((path, ranges))
    dup = sorted({a for a in alphabets if alphabets.count(a) > 1})
    if dup:
        raise ValueError(f"{tsv}: alphabets {dup} are listed more than once; list each alphabet once")
    stat = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in [*files, tsv]]

    def decode(size: int, resample: str) -> np.ndarray:
        parts = []
        for path, ranges in plan:
            try:
                with np.load(path, allow_pickle=False) as z:
                    arr = z["images"]
            except Exception as e:  # zipfile / OS errors
                raise ValueError(f"{path}: cannot read as npz ({e}); expected {_NPZ_FMT}") from e
            if arr.dtype != np.bool_:
                lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
                if lo < 0 or hi > 1:
                    raise ValueError(
                        f"{path}: 'images' is {arr.dtype} with values in [{lo}, {hi}]; expected "
                        f"{_NPZ_FMT}. Convert grey images to a mask first (e.g. images > 127)"
                    )
                arr = arr.astype(bool)  # a 0/1 mask is scaled like a bool one (1 -> 255, white)
            for lo, hi in ranges:
                parts.append(_resize_block(arr[lo:hi], size, resample))
        return np.concatenate(parts)

    n_drawings = headers[0][0][1]
    return _Listing(alphabets, alphabet_of, char_index, names, repr((stat, headers)), n_drawings, decode)


def _list_pngs(
    trees: Sequence[tuple[str, dict[str, dict[str, list[str]]], Callable[[], Any]]], fingerprint: str
) -> _Listing:
    """Listing of PNG drawings grouped ``{alphabet: {character: [entries]}}`` per set.

    ``trees`` holds ``(where, tree, opener)`` per set: ``where`` names the source in errors and
    ``opener()`` is a context manager giving ``open(entry) -> binary file`` (a folder or a zip).
    Alphabets sort by name, characters and drawings in natural order (``character2`` < ``character10``).
    """
    alphabets: list[str] = []
    alphabet_of: list[int] = []
    char_index: list[int] = []
    names: list[str] = []
    pngs: list[tuple[int, list[str]]] = []  # (set index, entries) per character
    for t, (where, tree, _) in enumerate(trees):
        for alpha in sorted(tree):
            a = len(alphabets)
            alphabets.append(alpha)
            for k, ch in enumerate(sorted(tree[alpha], key=_natural_key)):
                files = sorted(tree[alpha][ch], key=lambda e: _natural_key(PurePosixPath(e).name))
                if pngs and len(files) != len(pngs[0][1]):
                    raise ValueError(
                        f"{where}/{alpha}/{ch}: {len(files)} drawings, but other "
                        f"characters have {len(pngs[0][1])}; expected the same number of *.png each"
                    )
                if not files:
                    raise ValueError(f"{where}/{alpha}/{ch}: no *.png drawings")
                alphabet_of.append(a)
                char_index.append(k)
                names.append(f"{alpha}/{ch}")
                pngs.append((t, files))
    if not pngs:
        raise ValueError(f"{', '.join(w for w, _, _ in trees)}: layout found but it contains no character folders")

    def decode(size: int, resample: str) -> np.ndarray:
        out = np.empty((len(pngs), len(pngs[0][1]), size, size), dtype=np.uint8)
        with contextlib.ExitStack() as stack:
            openers = [stack.enter_context(opener()) for _, _, opener in trees]
            for i, (t, files) in enumerate(pngs):
                for j, entry in enumerate(files):
                    try:
                        with openers[t](entry) as f, Image.open(f) as img:
                            grey = np.asarray(img.convert("L"))
                    except (UnidentifiedImageError, OSError, zipfile.BadZipFile) as e:
                        raise ValueError(f"{trees[t][0]}: {entry}: cannot decode as PNG ({e})") from e
                    out[i, j] = pil_resize(grey, size, resample)
        return out

    return _Listing(alphabets, alphabet_of, char_index, names, fingerprint, len(pngs[0][1]), decode)


@contextlib.contextmanager
def _open_files() -> Iterator[Callable[[str], IO[bytes]]]:
    yield lambda entry: open(entry, "rb")  # noqa: SIM115 - the caller's `with` closes each file


def _list_folders(root: Path, sets: Sequence[str]) -> _Listing:
    trees, digest = [], hashlib.sha1()
    for s in sets:
        tree: dict[str, dict[str, list[str]]] = {}
        for alpha in (p for p in (root / s).iterdir() if p.is_dir() and p.name[0] != "."):
            tree[alpha.name] = {
                ch.name: [str(p) for p in ch.iterdir() if p.suffix.lower() == ".png"]
                for ch in alpha.iterdir()
                if ch.is_dir() and ch.name[0] != "."
            }
        for f in sorted(f for chars in tree.values() for files in chars.values() for f in files):
            st = os.stat(f)
            digest.update(f"{Path(f).relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
        trees.append((str(root / s), tree, _open_files))
    return _list_pngs(trees, digest.hexdigest())


def _list_zips(root: Path, sets: Sequence[str]) -> _Listing:
    """The official archives as downloaded: ``<set>.zip`` holding ``<set>/<Alphabet>/characterNN/*.png``."""
    trees, stat = [], []
    for s in sets:
        path = root / f"{s}.zip"
        try:
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(
                f"{path}: cannot read as a zip archive ({e}); expected the official "
                f"{s}.zip holding {s}/<Alphabet>/characterNN/*.png"
            ) from e
        tree: dict[str, dict[str, list[str]]] = {}
        for name in members:
            parts = PurePosixPath(name).parts
            if (
                len(parts) >= 3
                and parts[-1].lower().endswith(".png")
                and not any(p.startswith((".", "__MACOSX")) for p in parts)
            ):
                tree.setdefault(parts[-3], {}).setdefault(parts[-2], []).append(name)
        trees.append((str(path), tree, functools.partial(_open_zip, path)))
        stat.append((str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns))
    return _list_pngs(trees, repr(stat))


@contextlib.contextmanager
def _open_zip(path: Path) -> Iterator[Callable[[str], IO[bytes]]]:
    with zipfile.ZipFile(path) as z:
        yield z.open


def load_omniglot(
    root: str | Path,
    image_size: int = 28,
    cache_dir: str | Path | None = None,
    resample: Literal["lanczos", "nearest", "bilinear", "bicubic", "box"] = "lanczos",
    sets: Sequence[str] = SETS,
) -> Omniglot:
    """Load Omniglot from ``root`` (npz form, original folder layout or the official zips).

    Args:
        root: dataset folder (see the module docstring for the three layouts).
        image_size: side ``S`` of the resized square images (105 = native).
        cache_dir: if given, the resized ``uint8`` arrays are cached there and
            reused while the source files are unchanged.
        resample: PIL filter for the one-off resize (see module docstring).
        sets: which Omniglot sets to load, in order.

    Returns:
        :class:`Omniglot` with ``images`` float32 ``(n_chars, 20, 1, S, S)``.

    Raises:
        FileNotFoundError: no layout is found under ``root`` (the message lists them).
        ValueError: a file is malformed (the message names it).
    """
    base = Path(root).expanduser()
    listing = None
    for cand in (base, base / "omniglot-py"):
        if all((cand / f"{s}.npz").is_file() for s in sets) and (cand / "alphabets.tsv").is_file():
            listing = _list_npz(cand, sets)
        elif all((cand / s).is_dir() for s in sets):
            listing = _list_folders(cand, sets)
        elif all((cand / f"{s}.zip").is_file() for s in sets):
            listing = _list_zips(cand, sets)
        if listing is not None:
            break
    if listing is None:
        raise FileNotFoundError(
            f"Omniglot not found at {base}: expected either the npz form "
            f"({', '.join(s + '.npz' for s in sets)} and alphabets.tsv) or the original folder layout "
            f"({', '.join(s + '/<Alphabet>/characterNN/*.png' for s in sets)}) or the official archives "
            f"({', '.join(s + '.zip' for s in sets)}) in {base} or {base / 'omniglot-py'}"
        )

    u8 = None
    cache_file = None
    shape = (len(listing.alphabet_of), listing.n_drawings, image_size, image_size)
    # The fingerprint names the source files and the array the cache must hold: a cache written
    # for other sources, or holding anything but that uint8 array, is rebuilt.
    fingerprint = f"{listing.fingerprint}|uint8{shape}"
    if cache_dir is not None:
        key = hashlib.sha1(f"{base.resolve()}|{tuple(sets)}".encode()).hexdigest()[:12]
        cache_file = Path(cache_dir) / f"omniglot_{key}_{image_size}_{resample}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    if str(z["fingerprint"]) == fingerprint:
                        cached = z["images"]
                        if cached.shape == shape and cached.dtype == np.uint8:
                            u8 = cached
            except Exception:  # unreadable cache: rebuild it
                u8 = None
    if u8 is None:
        u8 = listing.decode(image_size, resample)
        if u8.shape != shape:  # the listing and the decoded files disagree: never cache that
            raise ValueError(
                f"{base}: decoded images have shape {u8.shape}, expected {shape}; the files "
                f"changed while loading? Load again"
            )
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.stem + f".tmp{os.getpid()}.npz")
            np.savez(tmp, images=u8, fingerprint=np.array(fingerprint))
            os.replace(tmp, cache_file)
    images = 1.0 - torch.from_numpy(u8).float().div_(255.0)  # invert: ink = 1
    return Omniglot(
        alphabets=listing.alphabets,
        characters=[(listing.alphabets[a], k) for a, k in zip(listing.alphabet_of, listing.char_index)],
        images=images.unsqueeze(2).contiguous(),
        alphabet_of=torch.tensor(listing.alphabet_of, dtype=torch.long),
        character_names=listing.char_names,
    )


def _make_task(
    om: Omniglot, alphabet: str, classes: int, num_holdout: int, holdout: str, augmentation: dict | None
) -> ClassificationTask:
    rows = om.characters_of(alphabet)[:classes]
    x = om.images[rows]  # (classes, D, 1, S, S)
    d = x.shape[1]
    if not 0 < num_holdout < d:
        raise ValueError(f"num_holdout must be in 1..{d - 1}, got {num_holdout}")
    if holdout == "last":
        tr, te = x[:, : d - num_holdout], x[:, d - num_holdout :]
    elif holdout == "first":
        tr, te = x[:, num_holdout:], x[:, :num_holdout]
    else:
        raise ValueError(f"holdout must be 'last' or 'first', got {holdout!r}")
    labels = torch.arange(classes, device=x.device)
    return ClassificationTask(
        alphabet,
        tr.flatten(0, 1),
        labels.repeat_interleave(tr.shape[1]),
        te.flatten(0, 1),
        labels.repeat_interleave(te.shape[1]),
        AUGMENTATION if augmentation is None else augmentation,
    )


def multishot_split(
    omniglot: Omniglot,
    seed: int,
    num_pretrain: int,
    num_test: int = 10,
    classes: int = 20,
    num_holdout: int = 5,
    holdout: Literal["last", "first"] = "last",
    augmentation: dict | None = None,
) -> tuple[list[ClassificationTask], list[ClassificationTask]]:
    """Meta-train and meta-test tasks of the multi-shot Omniglot protocol.

    Alphabets with fewer than ``classes`` characters are dropped (46 of 50
    remain for ``classes=20``); the *sorted* list of the rest is permuted with
    ``numpy.random.default_rng(seed)``; the first ``num_test`` are the held-out
    meta-test tasks and the next ``num_pretrain`` the meta-training tasks (so
    the test alphabets of a seed do not depend on ``num_pretrain``). Each task
    is a ``classes``-way problem over the alphabet's first ``classes``
    characters. Per character, ``num_holdout`` drawings form the task's test
    set: the last ones in drawer order by default (``holdout="first"`` holds
    out the first ones, as the original implementation's file order did).

    ``augmentation`` holds :func:`~warpopt.data.transforms.random_affine` keyword arguments for training
    batches (default :data:`AUGMENTATION`); ``task.sample(..., augment=False)``
    turns it off per call.

    Returns:
        ``(train_tasks, test_tasks)`` lists of :class:`ClassificationTask` on
        ``omniglot.images.device`` (tensors copied out of ``omniglot.images``).
    """
    eligible = sorted(a for a in omniglot.alphabets if len(omniglot.characters_of(a)) >= classes)
    if num_pretrain < 0 or num_test < 0 or num_pretrain + num_test > len(eligible):
        raise ValueError(
            f"num_pretrain={num_pretrain} + num_test={num_test} exceeds the "
            f"{len(eligible)} alphabets with >= {classes} characters"
        )
    order = np.random.default_rng(seed).permutation(len(eligible))
    shuffled = [eligible[i] for i in order]
    test = shuffled[:num_test]
    train = shuffled[num_test : num_test + num_pretrain]
    make = lambda a: _make_task(omniglot, a, classes, num_holdout, holdout, augmentation)  # noqa: E731
    return [make(a) for a in train], [make(a) for a in test]


class OmniglotRotationPool(TensorClassPool):
    """Omniglot characters x 4 rotations as classes (few-shot protocol).

    Class ``4 * i + r`` is character ``rows[i]`` rotated by ``90 * r`` degrees
    counter-clockwise (``torch.rot90``); rotations are computed on access, so no
    extra memory is used. ``images_of(c)`` is ``(20, 1, S, S)``.
    """

    def __init__(self, omniglot: Omniglot, rows: Sequence[int]) -> None:
        self._source = omniglot.images
        self._rows = list(rows)
        self.class_names = [f"{omniglot.character_names[r]}/rot{90 * k:03d}" for r in self._rows for k in range(4)]

    @property
    def num_classes(self) -> int:
        return 4 * len(self._rows)

    def size_of(self, c: int) -> int:
        return int(self._source.shape[1])

    def images_of(self, c: int) -> torch.Tensor:
        return torch.rot90(self._source[self._rows[c // 4]], c % 4, dims=(-2, -1))

    def images_at(self, c: int, index: torch.Tensor) -> torch.Tensor:
        x = self._source[self._rows[c // 4]][index.to(self._source.device)]
        return torch.rot90(x, c % 4, dims=(-2, -1))

    def to(self, device: torch.device | str) -> TensorClassPool:
        return TensorClassPool([self.images_of(c).to(device) for c in range(self.num_classes)], self.class_names)


def vinyals_split(omniglot: Omniglot) -> dict[str, OmniglotRotationPool]:
    """The Vinyals et al. (2016) few-shot split (prototypical-networks lists).

    Rule reproducing ``splits/vinyals/{train,val,test}.txt`` of
    jakesnell/prototypical-networks: order characters as :class:`Omniglot`
    does (background alphabets sorted, then evaluation alphabets sorted);
    the first 1200 characters are train+val (all background alphabets plus
    the evaluation alphabets Angelic .. Glagolitic and Gurmukhi characters
    1-41), the remaining 423 (Gurmukhi 42-45 and the 12 later alphabets) are
    test; val is the 5 alphabets of :data:`VINYALS_VAL_ALPHABETS` (172
    characters), train the other 1028. Each character gives 4 classes
    (rotations 0, 90, 180, 270), so 4112 / 688 / 1692 classes.

    Raises:
        ValueError: ``omniglot`` is not the full 1623-character dataset.
    """
    if len(omniglot) != 1623 or not set(VINYALS_VAL_ALPHABETS) <= set(omniglot.alphabets):
        raise ValueError(f"vinyals_split needs the full Omniglot (1623 characters, both sets); got {len(omniglot)}")
    val_ids = {omniglot.alphabets.index(a) for a in VINYALS_VAL_ALPHABETS}
    alphabet_of = omniglot.alphabet_of.tolist()
    val = [i for i in range(1200) if alphabet_of[i] in val_ids]
    train = [i for i in range(1200) if alphabet_of[i] not in val_ids]
    test = list(range(1200, 1623))
    if (len(train), len(val), len(test)) != (1028, 172, 423):
        raise ValueError(f"unexpected Vinyals split sizes {len(train)}/{len(val)}/{len(test)} (want 1028/172/423)")
    return {
        name: OmniglotRotationPool(omniglot, rows) for name, rows in (("train", train), ("val", val), ("test", test))
    }
