"""Fetching a dataset's official files, checked by SHA-256 (never called at import or by default).

Only Omniglot can be fetched: its two official archives are public (MIT licence, Lake et al.
2015) and :func:`~warpopt.data.omniglot.load_omniglot` reads them still zipped. miniImageNet and
tieredImageNet are ImageNet derivatives under ImageNet's terms of access; fetch them yourself
(the README says from where and in which layout).

A file is written under a temporary name in the destination folder, hashed while it streams,
and renamed into place only when its SHA-256 matches: an interrupted or corrupted download
leaves nothing behind, and a file already present is verified, never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["OMNIGLOT_URL", "OMNIGLOT_ARCHIVES", "fetch", "download_omniglot", "sha256_of"]

#: Where the official Omniglot archives live (github.com/brendenlake/omniglot, folder python/).
OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
#: name -> (SHA-256, size in bytes) of the official archives (as recorded by tensorflow-datasets).
OMNIGLOT_ARCHIVES: dict[str, tuple[str, int]] = {
    "images_background.zip": ("ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640", 9464212),
    "images_evaluation.zip": ("1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee", 6462886),
}
_CHUNK = 1 << 16


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    url: str, dest: str | Path, sha256: str, *, timeout: float = 60.0, progress: Callable[[int], None] | None = None
) -> Path:
    """Download ``url`` to ``dest`` if it is not there yet, and check its SHA-256.

    ``progress(n)`` is called with each chunk's byte count. Only ``http``/``https`` URLs are
    accepted.

    Raises:
        ValueError: the URL scheme is not http(s); the downloaded bytes (nothing is kept) or an
            existing ``dest`` (left untouched) do not have the expected SHA-256.
        OSError: the download failed (``urllib.error.URLError`` is one); nothing is kept.
    """
    dest = Path(dest)
    if dest.exists():
        found = sha256_of(dest)
        if found != sha256:
            raise ValueError(
                f"{dest} exists but its SHA-256 is {found}, not the expected {sha256}: "
                f"delete it (a partial or different file) and run again"
            )
        return dest
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"refusing to fetch {url!r}: only http and https URLs are supported")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"{url}: downloaded file has SHA-256 {digest.hexdigest()}, expected {sha256}; "
                f"nothing was kept (a changed or corrupted file, or a proxy's error page)"
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def download_omniglot(
    root: str | Path,
    *,
    base_url: str = OMNIGLOT_URL,
    archives: Mapping[str, tuple[str, int]] = OMNIGLOT_ARCHIVES,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Fetch the official ``images_background.zip`` and ``images_evaluation.zip`` into ``root``.

    ``load_omniglot(root)`` then reads them as they are (no unzipping needed). ``base_url`` and
    ``archives`` (name -> (SHA-256, size)) exist for mirrors and tests. Returns ``root``.
    """
    root = Path(root).expanduser()
    for name, (sha256, _) in archives.items():
        fetch(urllib.parse.urljoin(base_url, name), root / name, sha256, progress=progress)
    return root
