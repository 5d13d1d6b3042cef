"""Omniglot's official archives: read while still zipped, fetched over HTTP and checked by SHA-256.

The server is a local ``http.server`` on 127.0.0.1 serving archives generated here in the
official layout (``images_background.zip`` holding ``images_background/<Alphabet>/characterNN/*.png``).
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from warpopt.data import download_omniglot, load_omniglot
from warpopt.data.download import OMNIGLOT_ARCHIVES, fetch

SETS = {"images_background": {"Beta": 2, "Alpha": 3}, "images_evaluation": {"Gamma": 2}}


def _write_tree(root: Path) -> None:
    """The original folder layout: a character's drawing d has d + 1 + 20 * (its global index) ink pixels."""
    uid = 0
    for s, alphabets in SETS.items():
        for alpha in sorted(alphabets):
            for k in range(alphabets[alpha]):
                folder = root / s / alpha / f"character{k + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(20):
                    img = np.ones(105 * 105, dtype=bool)
                    img[: uid * 20 + d + 1] = False
                    Image.fromarray(img.reshape(105, 105)).save(folder / f"{uid:04d}_{d + 1:02d}.png")
                uid += 1


def _zip_tree(tree: Path, out: Path) -> dict[str, tuple[str, int]]:
    """``<set>.zip`` per set, members ``<set>/<Alphabet>/characterNN/*.png`` (the official layout)."""
    out.mkdir(parents=True, exist_ok=True)
    sums = {}
    for s in SETS:
        path = out / f"{s}.zip"
        with zipfile.ZipFile(path, "w") as z:
            for f in sorted((tree / s).rglob("*.png"), reverse=True):  # stored out of order on purpose
                z.write(f, f.relative_to(tree).as_posix())
            z.writestr("__MACOSX/._junk.png", b"not an image")
        sums[path.name] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)
    return sums


@pytest.fixture()
def archives(tmp_path: Path):
    _write_tree(tmp_path / "tree")
    sums = _zip_tree(tmp_path / "tree", tmp_path / "served")
    return tmp_path / "tree", tmp_path / "served", sums


@pytest.fixture()
def server(archives):
    _, served, _ = archives
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", httpd
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:
        _QuietHandler.requests.append(self.path)


def test_zipped_archives_load_like_the_unzipped_folders(archives) -> None:
    tree, served, _ = archives
    unzipped, zipped = load_omniglot(tree, image_size=28), load_omniglot(served, image_size=28)
    assert zipped.alphabets == unzipped.alphabets == ["Alpha", "Beta", "Gamma"]
    assert zipped.character_names == unzipped.character_names
    assert torch.equal(zipped.images, unzipped.images)
    native = load_omniglot(served, image_size=105)
    ink = native.images.sum(dim=(2, 3, 4)).long()
    assert ink.tolist() == [[i * 20 + d + 1 for d in range(20)] for i in range(7)]  # drawer order kept


def test_download_fetches_verifies_and_loads(tmp_path: Path, archives, server) -> None:
    _, served, sums = archives
    url, _ = server
    seen = []
    root = download_omniglot(tmp_path / "data" / "omniglot", base_url=url, archives=sums, progress=seen.append)
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert sum(seen) == sum(size for _, size in sums.values())
    assert torch.equal(load_omniglot(root, image_size=28).images, load_omniglot(served, image_size=28).images)
    # A second call verifies what is there and fetches nothing.
    _QuietHandler.requests.clear()
    download_omniglot(root, base_url=url, archives=sums)
    assert _QuietHandler.requests == []


def test_checksum_mismatch_keeps_nothing(tmp_path: Path, archives, server) -> None:
    url, _ = server
    dest = tmp_path / "omniglot"
    # The official checksums do not match the generated archives: refused, no file left behind.
    with pytest.raises(ValueError, match="SHA-256"):
        download_omniglot(dest, base_url=url, archives=OMNIGLOT_ARCHIVES)
    assert list(dest.iterdir()) == []


def test_existing_file_with_wrong_checksum_is_not_overwritten(tmp_path: Path, archives, server) -> None:
    url, _ = server
    _, _, sums = archives
    dest = tmp_path / "images_background.zip"
    dest.write_bytes(b"partial")
    with pytest.raises(ValueError, match="delete it"):
        fetch(url + "images_background.zip", dest, sums["images_background.zip"][0])
    assert dest.read_bytes() == b"partial"


def test_only_http_urls_are_fetched(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    with pytest.raises(ValueError, match="http"):
        fetch(secret.as_uri(), tmp_path / "copy", hashlib.sha256(b"x").hexdigest())
    assert not (tmp_path / "copy").exists()


def test_missing_server_file_raises_and_keeps_nothing(tmp_path: Path, server) -> None:
    url, _ = server
    dest = tmp_path / "fetched"
    with pytest.raises(OSError):
        fetch(url + "nope.zip", dest / "nope.zip", "0" * 64)
    assert list(dest.iterdir()) == []
