"""Loading pickled data without running code.

``pickle.load`` calls whatever callable a file names, so a crafted ``.pkl`` runs arbitrary code
the moment it is opened. The dataset formats read here (miniImageNet caches, tieredImageNet
images and labels, written by Python 2 or 3 and numpy 1 or 2) only need numpy arrays, dtypes and
scalars and builtin containers: :class:`RestrictedUnpickler` resolves exactly those names and
refuses every other one *before* it is called, the way ``torch.load(weights_only=True)`` does.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "load_pickle"]

try:  # numpy >= 2 (numpy 1.26 has the same names under numpy.core)
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy < 1.26
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """How protocol 0-2 pickles written by Python 3 spell ``bytes``: ``_codecs.encode(text, 'latin1')``."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed for latin-1 text, got {encoding!r}")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for pkg in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings of the same functions
        table[(f"{pkg}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        table[(f"{pkg}.multiarray", "scalar")] = _multiarray.scalar
        # numpy's stubs omit this private function, which pickled arrays reference by name.
        table[(f"{pkg}.numeric", "_frombuffer")] = _numeric._frombuffer  # type: ignore[attr-defined]
    for name in ("set", "frozenset", "bytearray", "bytes", "complex"):
        table[("builtins", name)] = getattr(builtins, name)
    return table


_ALLOWED = _allowed()


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle names a callable or class outside the allow-list; nothing was executed."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves numpy array/dtype/scalar and builtin container names."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__.set, ...) mapped as pickle itself maps them; no Python 3
        # pickle uses those module names.
        key = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        try:
            return _ALLOWED[key]
        except KeyError:
            raise UnsafePickleError(".".join(key)) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"persistent id {pid!r}")


def load_pickle(path: str | Path, fmt: str) -> Any:
    """Load a (possibly Python 2) data pickle from ``path`` without running code.

    Raises:
        FileNotFoundError: ``path`` does not exist (``fmt`` describes what was expected).
        UnsafePickleError: the file references a type or callable outside the allow-list (the
            message names the file and the type; nothing was called).
        ValueError: the file is not a readable pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {fmt}")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{path}: refused to load: the pickle references {e}, which is not a data type of this "
            f"format (allowed: numpy arrays, dtypes and scalars, builtin containers). Loading data "
            f"never runs code; if you trust the file, re-save it as {fmt}"
        ) from None
    except Exception as e:  # any other unpickling failure means a malformed file
        raise ValueError(f"{path}: malformed pickle ({type(e).__name__}: {e}); expected {fmt}") from e
