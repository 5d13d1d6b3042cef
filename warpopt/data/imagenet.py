"""miniImageNet and tieredImageNet class pools (WarpGrad Appendix H).

The data cannot be shipped; these loaders read the formats the community uses:

miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split: 64 / 16 / 20
classes of 600 images), either

* pickle caches ``mini-imagenet-cache-{train,validation,test}.pkl``: a pickled
  dict with ``image_data`` (uint8 ``(N, 84, 84, 3)``) and ``class_dict``
  (``{class_name: [row indices]}``); or
* the Ravi & Larochelle CSV split: ``{train,val,test}.csv`` with header
  ``filename,label`` and the JPEGs in ``images/`` (decoded lazily per class,
  resized to 84x84 when they are not).

tieredImageNet (Ren et al. 2018: 351 / 97 / 160 classes): ``{split}_images_png.pkl``
(a pickled list / array of PNG-encoded images: ``bytes`` or 1-D ``uint8`` arrays)
and ``{split}_labels.pkl`` (a dict with ``label_specific`` - the class of each
image - and optionally ``label_general``, ``label_specific_str``,
``label_general_str``). PNGs are decoded lazily per class, with a small cache.

Every pool follows :class:`warpopt.data.episodes.ClassPool`: ``images_of(c)``
returns float32 ``(n_c, 3, H, W)`` in ``[0, 1]`` (optionally normalised by
``normalize=(mean, std)``); ``images_at(c, index)`` decodes only the requested
images; ``size_of(c)`` needs no decoding. Classes are numbered in sorted order
of their names (mini) or labels (tiered). Pickles are read with a restricted
unpickler (:mod:`warpopt.data.safe_pickle`): only numpy arrays, dtypes, scalars and
builtin containers are built, anything else is refused before it runs.
"""

from __future__ import annotations

import csv
import io
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .safe_pickle import load_pickle
from .transforms import pil_resize, resize

__all__ = [
    "MiniImageNetPickle",
    "MiniImageNetCSV",
    "TieredImageNet",
    "load_miniimagenet",
    "load_tieredimagenet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MINI_PICKLE_FMT = (
    "a pickled dict with 'image_data' (uint8 array (N, 84, 84, 3)) and 'class_dict' ({class_name: [row indices]})"
)
_MINI_CSV_FMT = "a CSV with header 'filename,label' and the listed JPEGs in images/"
_TIERED_IMAGES_FMT = "a pickled list/array of PNG-encoded images (bytes or 1-D uint8 arrays)"
_TIERED_LABELS_FMT = (
    "a pickled dict with 'label_specific' (int per image) and optionally "
    "'label_general', 'label_specific_str', 'label_general_str'"
)


class _Pool:
    """Shared logic: class membership lists, uint8 HWC -> float CHW, normalisation, cache."""

    def __init__(
        self,
        class_names: Sequence[str],
        members: Sequence[Sequence[int] | np.ndarray],
        image_size: int | None,
        normalize: tuple[Sequence[float], Sequence[float]] | None,
        cache_classes: int,
    ) -> None:
        self.class_names = list(class_names)
        self._members = [np.asarray(m, dtype=np.int64) for m in members]
        self.image_size = image_size
        self._norm = None
        if normalize is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in normalize)
            self._norm = (mean, std)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.cache_classes = int(cache_classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num_classes

    def size_of(self, c: int) -> int:
        return int(self._members[c].shape[0])

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        """uint8 ``(n, H, W, 3)`` images of the given dataset rows."""
        raise NotImplementedError

    def _to_float(self, u8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).float().div_(255.0)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = resize(x, self.image_size).clamp_(0.0, 1.0)
        if self._norm is not None:
            x = (x - self._norm[0]) / self._norm[1]
        return x

    def images_of(self, c: int) -> torch.Tensor:
        """All images of class ``c``: float32 ``(n_c, 3, H, W)`` (cached, LRU)."""
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        x = self._to_float(self._decode(self._members[c]))
        if self.cache_classes > 0:
            self._cache[c] = x
            while len(self._cache) > self.cache_classes:
                self._cache.popitem(last=False)
        return x

    def images_at(self, c: int, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Images ``index`` (positions within class ``c``): ``(len(index), 3, H, W)``."""
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        if c in self._cache:
            return self._cache[c][idx]
        return self._to_float(self._decode(self._members[c][idx.numpy()]))


class MiniImageNetPickle(_Pool):
    """miniImageNet from a ``mini-imagenet-cache-<split>.pkl`` file."""

    def __init__(
        self,
        path: str | Path,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        image_size: int | None = None,
    ) -> None:
        path = Path(path)
        obj = load_pickle(path, _MINI_PICKLE_FMT)
        if not isinstance(obj, dict) or "image_data" not in obj or "class_dict" not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}: malformed miniImageNet pickle (got {keys}); expected {_MINI_PICKLE_FMT}")
        data, class_dict = obj["image_data"], obj["class_dict"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{path}: 'image_data' is {desc}; expected {_MINI_PICKLE_FMT}")
        if not isinstance(class_dict, dict) or not class_dict:
            raise ValueError(f"{path}: 'class_dict' is empty or not a dict; expected {_MINI_PICKLE_FMT}")
        names = sorted(class_dict)
        members = []
        for name in names:
            rows = np.asarray(class_dict[name]).reshape(-1)
            if rows.size == 0 or rows.dtype.kind not in "iu" or rows.min() < 0 or rows.max() >= len(data):
                raise ValueError(
                    f"{path}: class_dict[{name!r}] holds invalid row indices for "
                    f"{len(data)} images; expected {_MINI_PICKLE_FMT}"
                )
            members.append(rows)
        self.path = path
        self._data = data
        super().__init__(names, members, image_size, normalize, cache_classes=0)

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        return self._data[rows]


class _EncodedFilePool(_Pool):
    """Pool whose images are decoded with PIL from files or byte strings."""

    def _source(self, row: int) -> Any:
        raise NotImplementedError

    def _describe(self, row: int) -> str:
        raise NotImplementedError

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        size = self.image_size
        out = []
        for r in rows.tolist():
            try:
                with Image.open(self._source(r)) as img:
                    arr = np.asarray(img.convert("RGB"))
            except FileNotFoundError:
                raise
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise ValueError(f"{self._describe(r)}: cannot decode image ({e})") from e
            if size is not None and arr.shape[:2] != (size, size):
                arr = pil_resize(arr, size, "lanczos")
            out.append(arr)
        shapes = {a.shape for a in out}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)}; pass image_size to resize them")
        return np.stack(out) if out else np.zeros((0, size or 84, size or 84, 3), np.uint8)


class MiniImageNetCSV(_EncodedFilePool):
    """miniImageNet from a Ravi & Larochelle ``<split>.csv`` over ``images/`` (lazy)."""

    def __init__(
        self,
        csv_path: str | Path,
        image_dir: str | Path | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        image_size: int | None = 84,
        cache_classes: int = 8,
    ) -> None:
        csv_path = Path(csv_path)
        self.image_dir = Path(image_dir) if image_dir is not None else csv_path.parent / "images"
        if not csv_path.is_file():
            raise FileNotFoundError(f"{csv_path} not found; expected {_MINI_CSV_FMT}")
        try:
            with open(csv_path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                rows = [r for r in reader if r]
        except (UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"{csv_path}: unreadable CSV ({e}); expected {_MINI_CSV_FMT}") from e
        if header is None or [h.strip() for h in header] != ["filename", "label"]:
            raise ValueError(f"{csv_path}: header is {header}; expected {_MINI_CSV_FMT}")
        bad = next((i for i, r in enumerate(rows) if len(r) != 2), None)
        if bad is not None:
            raise ValueError(f"{csv_path}: line {bad + 2} has {len(rows[bad])} fields; expected {_MINI_CSV_FMT}")
        self.files = [self.image_dir / r[0].strip() for r in rows]
        missing = next((p for p in self.files if not p.is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"{missing} (listed in {csv_path}) not found; expected {_MINI_CSV_FMT}")
        labels = [r[1].strip() for r in rows]
        names = sorted(set(labels))
        by_name: dict[str, list[int]] = {n: [] for n in names}
        for i, lab in enumerate(labels):
            by_name[lab].append(i)
        self.path = csv_path
        super().__init__(names, [by_name[n] for n in names], image_size, normalize, cache_classes)

    def _source(self, row: int) -> Any:
        return self.files[row]

    def _describe(self, row: int) -> str:
        return str(self.files[row])


class TieredImageNet(_EncodedFilePool):
    """tieredImageNet from ``<split>_images_png.pkl`` + ``<split>_labels.pkl`` (lazy decode)."""

    def __init__(
        self,
        images_path: str | Path,
        labels_path: str | Path,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        image_size: int | None = None,
        cache_classes: int = 8,
    ) -> None:
        images_path, labels_path = Path(images_path), Path(labels_path)
        labels = load_pickle(labels_path, _TIERED_LABELS_FMT)
        if not isinstance(labels, dict) or "label_specific" not in labels:
            keys = sorted(map(str, labels)) if isinstance(labels, dict) else type(labels).__name__
            raise ValueError(
                f"{labels_path}: malformed tieredImageNet labels (got {keys}); expected {_TIERED_LABELS_FMT}"
            )
        specific = np.asarray(labels["label_specific"]).reshape(-1)
        if specific.dtype.kind not in "iu":
            raise ValueError(
                f"{labels_path}: 'label_specific' has dtype {specific.dtype}; expected {_TIERED_LABELS_FMT}"
            )
        images = load_pickle(images_path, _TIERED_IMAGES_FMT)
        if not isinstance(images, (list, tuple, np.ndarray)):
            raise ValueError(f"{images_path}: got {type(images).__name__}; expected {_TIERED_IMAGES_FMT}")
        if len(images) != len(specific):
            raise ValueError(
                f"{images_path}: {len(images)} images but {labels_path} has "
                f"{len(specific)} labels; the two files must describe the same split"
            )
        self._images = images
        self.images_path, self.labels_path = images_path, labels_path
        self.label_general = np.asarray(labels["label_general"]) if "label_general" in labels else None
        self.label_general_str = list(labels.get("label_general_str", []))
        ids = np.unique(specific)
        strs = list(labels.get("label_specific_str", []))
        names = [str(strs[i]) if 0 <= i < len(strs) else str(int(i)) for i in ids.tolist()]
        self.labels = ids
        super().__init__(names, [np.flatnonzero(specific == i) for i in ids], image_size, normalize, cache_classes)

    def _source(self, row: int) -> Any:
        item = self._images[row]
        if isinstance(item, np.ndarray):
            item = item.tobytes()
        elif isinstance(item, str):  # Python 2 byte string unpickled as latin-1 text
            item = item.encode("latin1")
        return io.BytesIO(bytes(item))

    def _describe(self, row: int) -> str:
        return f"{self.images_path} (image {row})"


def _check_split(split: str, allowed: Sequence[str]) -> str:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; choose from {list(allowed)}")
    return split


def load_miniimagenet(
    root: str | Path,
    split: str,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    image_size: int | None = 84,
) -> MiniImageNetPickle | MiniImageNetCSV:
    """miniImageNet ``split`` (``"train"``, ``"val"``/``"validation"``, ``"test"``) from ``root``.

    Uses ``mini-imagenet-cache-<split>.pkl`` when present, otherwise the CSV
    layout ``<split>.csv`` + ``images/``. ``image_size`` resizes images that
    are not ``image_size`` x ``image_size`` (``None``: keep as stored).

    Raises:
        FileNotFoundError: neither layout is present (message lists both).
        ValueError: a file exists but is malformed (message names it).
    """
    split = _check_split(split, ("train", "val", "validation", "test"))
    root = Path(root).expanduser()
    pkl = root / f"mini-imagenet-cache-{'validation' if split in ('val', 'validation') else split}.pkl"
    csv_path = root / f"{'val' if split in ('val', 'validation') else split}.csv"
    if pkl.is_file():
        return MiniImageNetPickle(pkl, normalize=normalize, image_size=image_size)
    if csv_path.is_file():
        return MiniImageNetCSV(csv_path, normalize=normalize, image_size=image_size)
    raise FileNotFoundError(
        f"miniImageNet split {split!r} not found in {root}: expected either the pickle cache {pkl} "
        f"({_MINI_PICKLE_FMT}) or the Ravi & Larochelle CSV {csv_path} ({_MINI_CSV_FMT})"
    )


def load_tieredimagenet(
    root: str | Path,
    split: str,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    image_size: int | None = None,
    cache_classes: int = 8,
) -> TieredImageNet:
    """tieredImageNet ``split`` (``"train"``, ``"val"``, ``"test"``) from ``root``.

    Reads ``<split>_images_png.pkl`` and ``<split>_labels.pkl``; classes are
    the sorted ``label_specific`` values, named by ``label_specific_str``.

    Raises:
        FileNotFoundError / ValueError naming the missing or malformed file.
    """
    split = _check_split(split, ("train", "val", "test"))
    root = Path(root).expanduser()
    return TieredImageNet(
        root / f"{split}_images_png.pkl",
        root / f"{split}_labels.pkl",
        normalize=normalize,
        image_size=image_size,
        cache_classes=cache_classes,
    )
