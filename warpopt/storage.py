"""Where the replay buffer's recorded points live (Algorithm 2): device, CPU memory or disk.

A ``Storage`` turns a freshly recorded :class:`~warpopt.points.Point` into a stored one
(``put``), gives it back for replay (``get``) and frees it (``release``). ``put_many`` stores a
whole task's points or none of them, so a buffer can commit a task atomically.

``DiskStorage`` guarantees, for files it writes:

* isolation: every instance writes into its own fresh subdirectory ``warpopt-replay-XXXXXXXX``
  (``tempfile.mkdtemp``, mode 0700) of the directory it is given, so buffers and processes
  sharing one directory never see each other's files;
* exclusive, atomic files: each point is written to a new temporary name opened with
  ``O_CREAT | O_EXCL`` (an existing file or a planted symlink makes it fail, nothing is
  followed or overwritten), then linked to its final name (which must not exist either) and
  the temporary name removed; a failed write (disk full) leaves no file behind;
* cleanup: the subdirectory is removed by ``clear()`` and ``close()``, when the storage is
  garbage-collected and at interpreter exit (``weakref.finalize``); the next ``put`` after a
  ``clear()`` starts a fresh subdirectory;
* a vanished subdirectory gives a ``FileNotFoundError`` saying what to do (``clear()``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import replace

import torch

from .points import Point

__all__ = ["Storage", "DeviceStorage", "CPUStorage", "DiskStorage"]

PREFIX = "warpopt-replay-"


class Storage:
    """Where recorded points live. Subclasses override ``put`` (and ``get``/``release``/``clear``)."""

    def put(self, point: Point) -> Point:
        """Store one point; returns the stored version (what ``get``/``release`` take)."""
        return point

    def put_many(self, points: Iterable[Point]) -> list[Point]:
        """Store all ``points`` or none: on any error, what was stored is released and the
        error re-raised, so the storage holds exactly what it held before the call."""
        stored: list[Point] = []
        try:
            for point in points:
                stored.append(self.put(point))
        except BaseException:
            for point in reversed(stored):
                with contextlib.suppress(Exception):
                    self.release(point)
            raise
        return stored

    def get(self, point: Point) -> Point:
        """The stored point with its vectors in memory, ready for ``unflatten_point``."""
        return point

    def release(self, point: Point) -> None:
        """Free one stored point."""

    def clear(self) -> None:
        """Free everything this storage holds (every stored point becomes invalid)."""

    def close(self) -> None:
        """Free everything; the storage may still be used afterwards."""
        self.clear()


class DeviceStorage(Storage):
    """Keep points on the parameters' device (fastest replay; GPU memory K×|θ|)."""


class CPUStorage(Storage):
    """Keep points in CPU memory, optionally pinned so device copies are asynchronous."""

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory and torch.cuda.is_available()

    def _to_cpu(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_memory)
        return out.copy_(t, non_blocking=self.pin_memory)

    def put(self, point: Point) -> Point:
        return replace(point, vectors=tuple(self._to_cpu(v) for v in point.vectors))


def _remove_tree(path: str, owner_pid: int) -> None:
    # A forked child inherits the finalizer; only the process that made the directory removes it.
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class DiskStorage(Storage):
    """Write each point to its own file in a private subdirectory of ``directory``.

    Args:
        directory: where to make the subdirectory (created if missing); the system temporary
            directory by default. Several storages (or processes) may share it.
        fsync: ``os.fsync`` every file before it gets its final name. Off by default: the files
            only live as long as the storage, so durability across a crash does not matter, and
            local filesystems report a full disk at ``write``; turn it on for network
            filesystems that report write errors only when the data is flushed.

    ``directory`` is the private subdirectory in use (``None`` after ``clear()`` until the next
    ``put``). See the module docstring for the guarantees.
    """

    def __init__(self, directory: str | None = None, fsync: bool = False) -> None:
        self.parent = os.path.abspath(directory if directory is not None else tempfile.gettempdir())
        self.fsync = fsync
        self.directory: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._count = 0
        self._open()

    def _open(self) -> str:
        os.makedirs(self.parent, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix=PREFIX, dir=self.parent)
        self._finalizer = weakref.finalize(self, _remove_tree, self.directory, os.getpid())
        self._count = 0
        return self.directory

    def _vanished(self, directory: str) -> FileNotFoundError:
        return FileNotFoundError(
            errno.ENOENT,
            "the replay directory vanished (deleted while the buffer held points stored "
            "there); those points are lost: call clear() on the replay buffer (or on its storage) "
            "to drop them and start a fresh directory",
            directory,
        )

    def put(self, point: Point) -> Point:
        directory = self.directory or self._open()
        if not os.path.isdir(directory):
            raise self._vanished(directory)
        name = f"point-{self._count:09d}.pt"
        path, tmp = os.path.join(directory, name), os.path.join(directory, f".{name}.tmp")
        self._count += 1
        payload = [v.detach().cpu() for v in point.vectors]
        data = io.BytesIO()  # serialise first: a failing write then surfaces as the OSError it is
        torch.save(payload, data)
        try:
            fd = os.open(tmp, _CREATE, 0o600)  # O_EXCL: fails on any existing file or symlink
        except FileExistsError as e:
            raise FileExistsError(
                e.errno,
                "refusing to overwrite or follow a file that appeared in the "
                "private replay directory (something else writes there)",
                tmp,
            ) from None
        except FileNotFoundError:
            raise self._vanished(directory) from None
        try:
            try:
                _write_all(fd, data.getbuffer())
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            _publish(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        _unlink(tmp)
        # The layout and the vectors' shapes stay in memory (as meta tensors); the data is on disk.
        return replace(point, vectors=tuple(v.to("meta") for v in payload), path=path)

    def get(self, point: Point) -> Point:
        try:
            fd = os.open(point.path, _READ)  # O_NOFOLLOW: a symlink put in place of the file is refused
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise OSError(
                    e.errno,
                    f"cannot open replay point file ({e.strerror}); call clear() on "
                    f"the replay buffer to drop its points",
                    point.path,
                ) from None
            directory = os.path.dirname(point.path)
            if not os.path.isdir(directory):
                raise self._vanished(directory) from None
            raise FileNotFoundError(
                errno.ENOENT,
                "replay point file deleted while the buffer held it; "
                "call clear() on the replay buffer to drop its points",
                point.path,
            ) from None
        try:
            with os.fdopen(fd, "rb") as f:
                vectors = torch.load(f, weights_only=True)
        except Exception as e:  # truncated or overwritten by something else
            first = (str(e).splitlines() or [""])[0][:120]
            raise ValueError(
                f"{point.path}: unreadable replay point file ({type(e).__name__}: {first}); "
                f"call clear() on the replay buffer to drop its points"
            ) from e
        expected = [(v.dtype, v.shape) for v in point.vectors]
        if not isinstance(vectors, list) or [(v.dtype, v.shape) for v in vectors] != expected:
            raise ValueError(
                f"{point.path}: replay point file was changed after it was written "
                f"(expected tensors {expected}); call clear() on the replay buffer"
            )
        return replace(point, vectors=tuple(vectors), path=None)

    def release(self, point: Point) -> None:
        if point.path:
            _unlink(point.path)

    def clear(self) -> None:
        """Remove the subdirectory and every point in it; the next ``put`` makes a fresh one."""
        if self._finalizer is not None:
            self._finalizer()  # removes the directory once and unregisters the exit hook
        self._finalizer, self.directory, self._count = None, None, 0


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _publish(tmp: str, path: str) -> None:
    """Give the written file its final name, never replacing an existing one."""
    try:
        os.link(tmp, path)  # unlike rename, link fails if the final name exists
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST,
            "refusing to overwrite a file that appeared in the private replay directory (something else writes there)",
            path,
        ) from None
    except OSError as e:  # no hard links here (some FUSE / FAT filesystems): check, then rename
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        if os.path.lexists(path):
            raise FileExistsError(
                errno.EEXIST,
                "refusing to overwrite a file that appeared in the "
                "private replay directory (something else writes there)",
                path,
            ) from None
        os.rename(tmp, path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
