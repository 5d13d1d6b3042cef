"""Task trajectories and the replay buffer (Section 2.4, Algorithm 2).

K-step adaptation is a Monte-Carlo chain θ^τ = (θ_0, ..., θ_K) that samples p(θ | τ). A
``Trajectory`` records the points of one task as it adapts; at the end of the task it is
committed to a ``ReplayBuffer`` that the offline algorithm draws mini-batches from.

Each recorded point holds θ_k, the task optimizer's state at θ_k (momentum buffers, Adam
moments and step counts, needed to replay the user's update rule exactly) and the adaptable
buffers (BatchNorm statistics). A point is stored as one flat tensor per kind (a single copy
per step, on the parameters' device, no host round trip); optionally in half precision, in
pinned CPU memory or on disk. Step counts and integer buffers are never down-cast.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence

import torch

from .tasks import Task

__all__ = ["Point", "Sample", "Trajectory", "ReplayBuffer", "Storage",
           "DeviceStorage", "CPUStorage", "DiskStorage"]

State = dict[str, torch.Tensor]


FLOAT, EXACT, HOST = 0, 1, 2  # where a recorded tensor goes: see _kind


def _kind(key: str, t: torch.Tensor) -> int:
    # Step counts drive Adam's bias correction and integer buffers count batches: a
    # half-precision copy of either would change the replayed update, so they are kept
    # exactly. Step counts the optimizer keeps on the host (torch.optim's default) stay
    # there as Python numbers: copying them to a GPU would synchronise at every step.
    if key == "step" and t.device.type == "cpu" and t.numel() == 1:
        return HOST
    return EXACT if key == "step" or not t.is_floating_point() else FLOAT


@dataclass(frozen=True)
class _Layout:
    """Where each tensor of a point lives: the ``flat`` or ``exact`` vector, or ``host``."""

    state_keys: tuple[tuple[str, ...], ...]  # per parameter, the optimizer-state keys
    entries: tuple[tuple[int, int, int, torch.Size, torch.dtype], ...]  # kind, offset, numel, shape, dtype

    @staticmethod
    def of(tensors: Sequence[tuple[str, torch.Tensor]], state_keys) -> "_Layout":
        offsets = {FLOAT: 0, EXACT: 0, HOST: 0}
        entries = []
        for key, t in tensors:
            kind = _kind(key, t)
            entries.append((kind, offsets[kind], t.numel(), t.shape, t.dtype))
            offsets[kind] += t.numel()
        return _Layout(state_keys, tuple(entries))


@dataclass
class Point:
    """A recorded θ_k: ``float`` and ``exact`` flat vectors, host-side step counts, their layout."""

    step: int
    flat: torch.Tensor
    exact: torch.Tensor
    layout: _Layout
    path: Optional[str] = None  # set when the tensors live on disk
    host: tuple[float, ...] = ()

    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size() + self.exact.numel() * self.exact.element_size()


@dataclass
class Sample:
    """A replayed (τ, θ_k): what the meta-objectives evaluate (Eq. 7/8).

    ``params[i]`` has the shape of the i-th adapt parameter; ``states[i]`` is the task
    optimizer's state for it at θ_k (empty at θ_0); ``buffers`` are the adapt buffers;
    ``task_batch``/``meta_batch`` the batches L_task and L_meta are evaluated on.
    """

    task: Task
    task_id: int
    step: int
    params: list[torch.Tensor]
    states: list[State]
    buffers: list[torch.Tensor]
    task_batch: Any = None  # drawn at replay time (``warpopt.objectives.with_batches``)
    meta_batch: Any = None


def flatten_point(step: int, params: Sequence[torch.Tensor], states: Sequence[State],
                  buffers: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Point:
    """Copy θ_k, its optimizer state and buffers into one flat tensor per kind (one cat each).

    Nothing here waits for the device: device tensors are concatenated on the device, and
    host-side step counts are read on the host.
    """
    items: list[tuple[str, torch.Tensor]] = [("param", p) for p in params]
    for s in states:
        items.extend(s.items())
    items.extend(("buffer", b) for b in buffers)
    ref = params[0]
    layout = _Layout.of(items, tuple(tuple(s.keys()) for s in states))
    parts: dict[int, list[torch.Tensor]] = {FLOAT: [], EXACT: [], HOST: []}
    for (key, t), (kind, *_rest) in zip(items, layout.entries):
        parts[kind].append(t.detach().reshape(-1))
    flat_dtype = dtype or ref.dtype
    flat = (torch.cat([t.to(flat_dtype) for t in parts[FLOAT]]) if parts[FLOAT]
            else ref.new_empty(0, dtype=flat_dtype))
    exact_t = (torch.cat([t.to(torch.float64) for t in parts[EXACT]]) if parts[EXACT]
               else ref.new_empty(0, dtype=torch.float64))
    host = tuple(t.item() for t in parts[HOST])
    return Point(step, flat, exact_t, layout, host=host)


def unflatten_point(point: Point, device: torch.device) -> tuple[list[torch.Tensor], list[State], list[torch.Tensor]]:
    """Inverse of ``flatten_point``: tensors on ``device`` in their recorded dtypes.

    Host-side step counts come back as 0-dim CPU tensors, where the task optimizer kept them.
    """
    flat = point.flat.to(device, non_blocking=True)
    exact = point.exact.to(device, non_blocking=True)
    tensors = []
    for kind, offset, numel, shape, dtype in point.layout.entries:
        if kind == HOST:
            tensors.append(torch.tensor(point.host[offset], dtype=dtype).view(shape))
            continue
        src = exact if kind == EXACT else flat
        tensors.append(src[offset:offset + numel].view(shape).to(dtype))
    n_params = len(point.layout.state_keys)
    params, rest = tensors[:n_params], iter(tensors[n_params:])
    states = [{key: next(rest) for key in keys} for keys in point.layout.state_keys]
    return params, states, list(rest)


class Storage:
    """Where recorded points live. Subclasses override ``put`` (and ``get`` if they move data)."""

    def put(self, point: Point) -> Point:
        return point

    def get(self, point: Point) -> Point:
        return point

    def release(self, point: Point) -> None:
        pass


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
        return replace(point, flat=self._to_cpu(point.flat), exact=self._to_cpu(point.exact))


class DiskStorage(Storage):
    """Write each point to a file under ``directory`` (a temporary one by default)."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="warpopt-replay-")
        os.makedirs(self.directory, exist_ok=True)
        self._count = 0

    def put(self, point: Point) -> Point:
        path = os.path.join(self.directory, f"point-{self._count:09d}.pt")
        self._count += 1
        torch.save({"flat": point.flat.cpu(), "exact": point.exact.cpu()}, path)
        # The layout stays in memory; the tensors are replaced by the file's path.
        return replace(point, flat=torch.empty(0), exact=torch.empty(0), path=path)

    def get(self, point: Point) -> Point:
        data = torch.load(point.path, weights_only=True)
        return replace(point, flat=data["flat"], exact=data["exact"], path=None)

    def release(self, point: Point) -> None:
        if point.path and os.path.exists(point.path):
            os.remove(point.path)


@dataclass
class Trajectory:
    """The recorded points of one task, kept apart until the task ends cleanly.

    Points are added with ``record``; ``every`` keeps every k-th step (θ_0 always).
    """

    task: Task
    every: int = 1
    dtype: Optional[torch.dtype] = None
    points: list[Point] = field(default_factory=list)

    def record(self, step: int, params: Sequence[torch.Tensor], states: Sequence[State],
               buffers: Sequence[torch.Tensor]) -> None:
        if step % self.every == 0:
            self.points.append(flatten_point(step, params, states, buffers, self.dtype))

    def __len__(self) -> int:
        return len(self.points)


class ReplayBuffer:
    """Replay buffer of task parameterisations for offline meta-training (Algorithm 2).

    Args:
        storage: ``DeviceStorage()`` (default), ``CPUStorage(pin_memory=...)`` or ``DiskStorage(dir)``.
        capacity: keep at most this many points, chosen by reservoir sampling (uniform over
            all points offered since the last ``clear``); ``None`` keeps everything.
        every: record every k-th task step (θ_0 is always recorded).
        dtype: storage precision of parameters/moments (e.g. ``torch.float16``); replay
            casts back. Step counts and integer buffers are always stored exactly.
        include_final: record θ_K, the point after the last step (Algorithm 2 does).
        generator: torch.Generator for reservoir sampling and mini-batch order.
    """

    def __init__(self, storage: Optional[Storage] = None, capacity: Optional[int] = None, every: int = 1,
                 dtype: Optional[torch.dtype] = None, include_final: bool = True,
                 generator: Optional[torch.Generator] = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be a positive number of points or None, got {capacity}")
        if every < 1:
            raise ValueError(f"every must be >= 1 (record every k-th step), got {every}")
        self.storage = storage or DeviceStorage()
        self.capacity, self.every, self.dtype, self.include_final = capacity, every, dtype, include_final
        self.generator = generator or torch.Generator().manual_seed(0)
        self._points: list[tuple[int, Point]] = []  # (task id, point)
        self._tasks: dict[int, Task] = {}
        self._offered = 0
        self._next_id = 0

    def trajectory(self, task: Task) -> Trajectory:
        """A fresh trajectory for ``task`` recorded with this buffer's settings."""
        return Trajectory(task, self.every, self.dtype)

    def commit(self, trajectory: Trajectory, steps: int) -> int:
        """Add a finished task's points (Algorithm 2, line 9); returns the task's id.

        ``steps`` is K, the number of task updates taken: θ_K (the point after the last
        update) is kept only with ``include_final``. A meta-batch of |B| tasks × K steps
        therefore holds (K + 1)·|B| points (K·|B| without θ_K). All or nothing: if storing a
        point fails, the points already stored are released and the buffer, its counters and
        its generator are as they were.
        """
        points = list(trajectory.points)
        if not self.include_final and steps > 0 and points and points[-1].step == steps:
            points.pop()
        task_id = self.next_task_id()
        generator_state, offered = self.generator.get_state(), self._offered
        entries, stored, replaced = list(self._points), [], []
        try:
            for point in points:
                self._offered += 1
                slot = len(entries)
                if self.capacity is not None and len(entries) >= self.capacity:
                    # reservoir sampling: uniform over all points offered since the last clear
                    slot = int(torch.randint(self._offered, (1,), generator=self.generator))
                    if slot >= self.capacity:
                        continue
                kept = self.storage.put(point)
                stored.append(kept)
                if slot == len(entries):
                    entries.append((task_id, kept))
                else:
                    replaced.append(entries[slot][1])
                    entries[slot] = (task_id, kept)
        except BaseException:
            for kept in stored:
                self.storage.release(kept)
            self.generator.set_state(generator_state)
            self._offered = offered
            raise
        self._points, self._tasks[task_id], self._next_id = entries, trajectory.task, task_id + 1
        for old in replaced:  # only now: a failed commit must leave them in place
            if all(old is not p for _, p in entries):
                self.storage.release(old)
        live = {i for i, _ in self._points}
        self._tasks = {i: t for i, t in self._tasks.items() if i in live}
        return task_id

    def next_task_id(self) -> int:
        """The id the next committed task gets (ids restart after ``clear``)."""
        return self._next_id

    def task_points(self) -> dict[int, int]:
        """Task id -> number of its points in the buffer."""
        counts: dict[int, int] = {}
        for task_id, _ in self._points:
            counts[task_id] = counts.get(task_id, 0) + 1
        return counts

    def task_of(self, index: int) -> int:
        return self._points[index][0]

    def __len__(self) -> int:
        return len(self._points)

    @property
    def tasks(self) -> dict[int, Task]:
        return dict(self._tasks)

    def nbytes(self) -> int:
        """Bytes held by the stored tensors (0 for points on disk)."""
        return sum(p.nbytes() for _, p in self._points)

    def sample(self, index: int, device: torch.device) -> Sample:
        task_id, point = self._points[index]
        params, states, buffers = unflatten_point(self.storage.get(point), device)
        return Sample(self._tasks[task_id], task_id, point.step, params, states, buffers)

    def order(self, batch_size: int) -> list[list[int]]:
        """One pass over the buffer: mini-batches of indices drawn without replacement (Alg. 2, l. 14)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self._points), generator=self.generator).tolist()
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]

    def batches(self, batch_size: int, device: torch.device) -> Iterator[list[Sample]]:
        """The samples of ``order(batch_size)``, one mini-batch at a time."""
        for indices in self.order(batch_size):
            yield [self.sample(i, device) for i in indices]

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self._points) / batch_size)

    def clear(self) -> None:
        for _, point in self._points:
            self.storage.release(point)
        self._points.clear()
        self._tasks.clear()
        self._offered = 0
        self._next_id = 0

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "offered": self._offered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._offered = state["offered"]
