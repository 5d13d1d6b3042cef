"""Task trajectories and the replay buffer (Section 2.4, Algorithm 2).

K-step adaptation is a Monte-Carlo chain θ^τ = (θ_0, ..., θ_K) that samples p(θ | τ). A
``Trajectory`` records the points of one task as it adapts; at the end of the task it is
committed to a ``ReplayBuffer`` that the offline algorithm draws mini-batches from.

Each recorded point (``warpopt.points``) holds θ_k, the task optimizer's state at θ_k and the
adaptable buffers as one flat vector per dtype (a single copy per step, on the parameters'
device, no host round trip); optionally in half precision. Where points live (device, pinned
CPU memory, disk) is a ``Storage`` (``warpopt.storage``). The buffer records into an ``Arena``
(``warpopt.points``): each point's vectors are allocated once and reused after the point is
released (the buffer cleared, a point replaced, a task dropped), so the task loop does no large
allocation per step after the first meta-batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .points import Arena, Point, State, flatten_point, param_views, point_from_plain, point_to_plain, unflatten_point
from .step_hypers import StepHypers, from_plain, to_plain
from .storage import CPUStorage, DeviceStorage, DiskStorage, Storage
from .tasks import Task

__all__ = [
    "Point",
    "Sample",
    "Trajectory",
    "ReplayBuffer",
    "Storage",
    "DeviceStorage",
    "CPUStorage",
    "DiskStorage",
    "flatten_point",
    "unflatten_point",
]


@dataclass
class Sample:
    """A replayed (τ, θ_k): what the meta-objectives evaluate (Eq. 7/8).

    ``params[i]`` has the shape of the i-th adapt parameter; ``states[i]`` is the task
    optimizer's state for it at θ_k (empty at θ_0); ``buffers`` are the adapt buffers;
    ``task_batch``/``meta_batch`` the batches L_task and L_meta are evaluated on; ``hypers``
    the hyper-parameters and clipping of the step taken from θ_k (``warpopt.step_hypers``;
    None: the task optimizer's current param groups).
    """

    task: Task
    task_id: int
    step: int
    params: list[torch.Tensor]
    states: list[State]
    buffers: list[torch.Tensor]
    task_batch: Any = None  # drawn at replay time (``warpopt.objectives.with_batches``)
    meta_batch: Any = None
    hypers: StepHypers | None = None


@dataclass
class Trajectory:
    """The recorded points of one task, kept apart until the task ends cleanly.

    Points are added with ``record``; ``every`` keeps every k-th step (θ_0 always).
    ``hypers[k]``: what the step from θ_k used (``note_hypers``; host-side, beside the points).
    With an ``arena`` the points' vectors come from it; ``discard`` gives them back (a dropped task).
    """

    task: Task
    every: int = 1
    dtype: torch.dtype | None = None
    points: list[Point] = field(default_factory=list)
    hypers: dict[int, StepHypers] = field(default_factory=dict)
    arena: Arena | None = None

    def record(
        self, step: int, params: Sequence[torch.Tensor], states: Sequence[State], buffers: Sequence[torch.Tensor]
    ) -> None:
        if step % self.every == 0:
            self.points.append(flatten_point(step, params, states, buffers, self.dtype, self.arena))

    def params_at(self, step: int) -> list[torch.Tensor] | None:
        """θ_``step`` as recorded (read-only views, no copy), or None where it was not recorded
        exactly (a step ``every`` skips, half-precision storage): θ0 learners read it instead of
        keeping their own copy of θ_k (issue 18)."""
        if step % self.every or step // self.every >= len(self.points):
            return None
        point = self.points[step // self.every]
        return param_views(point) if point.step == step else None

    def discard(self) -> None:
        """Drop the points (the task is not committed); their memory goes back to the arena."""
        if self.arena is not None:
            for point in self.points:
                self.arena.give_back(point.vectors)
        self.points = []

    def note_hypers(self, step: int, hypers: StepHypers) -> None:
        """Keep what the step from θ_``step`` used (issue 14: the step replayed is the step taken)."""
        if step % self.every == 0:
            self.hypers[step] = hypers

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

    def __init__(
        self,
        storage: Storage | None = None,
        capacity: int | None = None,
        every: int = 1,
        dtype: torch.dtype | None = None,
        include_final: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be a positive number of points or None, got {capacity}")
        if every < 1:
            raise ValueError(f"every must be >= 1 (record every k-th step), got {every}")
        self.storage = storage or DeviceStorage()
        self.capacity, self.every, self.dtype, self.include_final = capacity, every, dtype, include_final
        self.generator = generator or torch.Generator().manual_seed(0)
        self._points: list[tuple[int, Point]] = []  # (task id, point)
        self._arena = Arena()  # the recorded vectors, reused across tasks and meta-steps
        self._tasks: dict[int, Task] = {}
        self._hypers: dict[int, dict[int, StepHypers]] = {}  # task id -> step -> what the step used
        self._offered = 0
        self._next_id = 0

    def trajectory(self, task: Task) -> Trajectory:
        """A fresh trajectory for ``task`` recorded with this buffer's settings."""
        return Trajectory(task, self.every, self.dtype, arena=self._arena)

    def commit(self, trajectory: Trajectory, steps: int) -> int:
        """Add a finished task's points (Algorithm 2, line 9); returns the task's id.

        ``steps`` is K, the number of task updates taken: θ_K (the point after the last
        update) is kept only with ``include_final``. A meta-batch of |B| tasks × K steps
        therefore holds (K + 1)·|B| points (K·|B| without θ_K). All or nothing: if storing a
        point fails, the points already stored are released and the buffer, its counters and
        its generator are as they were.
        """
        points = list(trajectory.points)
        dropped = []  # recorded but not kept: their vectors go back to the arena once committed
        if not self.include_final and steps > 0 and points and points[-1].step == steps:
            dropped.append(points.pop())
        task_id = self.next_task_id()
        generator_state, offered = self.generator.get_state(), self._offered
        plan: list[tuple[int, Point]] = []  # (slot, point): a slot past the end appends
        size = len(self._points)
        for point in points:  # the reservoir draws first: nothing is stored yet
            self._offered += 1
            if self.capacity is None or size < self.capacity:
                plan.append((size, point))
                size += 1
                continue
            slot = int(torch.randint(self._offered, (1,), generator=self.generator))
            if slot < self.capacity:  # reservoir sampling: replace a uniformly chosen slot
                plan.append((slot, point))
            else:
                dropped.append(point)
        try:
            stored = self.storage.put_many([point for _, point in plan])
        except BaseException:
            self.generator.set_state(generator_state)
            self._offered = offered
            raise
        entries, replaced = list(self._points), []
        for (slot, _), kept in zip(plan, stored):
            if slot == len(entries):
                entries.append((task_id, kept))
            else:
                replaced.append(entries[slot][1])
                entries[slot] = (task_id, kept)
        self._points, self._tasks[task_id], self._next_id = entries, trajectory.task, task_id + 1
        self._hypers[task_id] = dict(trajectory.hypers)
        live = {id(p) for _, p in entries}
        for old in replaced:  # only now: a failed commit must leave them in place
            if id(old) not in live:
                self.storage.release(old)
                self._arena.give_back(old.vectors)
        for (_, recorded), kept in zip(plan, stored):  # stored elsewhere (disk, host): recorded copy free
            self._arena.give_back(v for v, w in zip(recorded.vectors, kept.vectors) if v is not w)
        for point in dropped:
            self._arena.give_back(point.vectors)
        trajectory.points = []  # the buffer owns them now (a second commit would store nothing twice)
        tasks = {i for i, _ in entries}
        self._tasks = {i: t for i, t in self._tasks.items() if i in tasks}
        self._hypers = {i: h for i, h in self._hypers.items() if i in tasks}
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
        return Sample(
            self._tasks[task_id],
            task_id,
            point.step,
            params,
            states,
            buffers,
            hypers=self._hypers.get(task_id, {}).get(point.step),
        )

    def order(self, batch_size: int) -> list[list[int]]:
        """One pass over the buffer: mini-batches of indices drawn without replacement (Alg. 2, l. 14)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self._points), generator=self.generator).tolist()
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def batches(self, batch_size: int, device: torch.device) -> Iterator[list[Sample]]:
        """The samples of ``order(batch_size)``, one mini-batch at a time."""
        for indices in self.order(batch_size):
            yield [self.sample(i, device) for i in indices]

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self._points) / batch_size)

    def clear(self) -> None:
        """Drop every point; their memory stays in the buffer's arena for the next recordings
        (``close()`` lets it go)."""
        for _, point in self._points:
            self.storage.release(point)
            self._arena.give_back(point.vectors)
        self.storage.clear()
        self._points.clear()
        self._tasks.clear()
        self._hypers.clear()
        self._offered = 0
        self._next_id = 0

    def close(self) -> None:
        """``clear()``, then free the recording memory kept for reuse and close the storage."""
        self.clear()
        self._arena.clear()
        self.storage.close()

    def arena_nbytes(self) -> int:
        """Bytes of recording memory kept for reuse (not in any point)."""
        return self._arena.nbytes()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "offered": self._offered}

    # Checkpoints mid meta-batch (issue 14): the points themselves, as plain tensors on the CPU.
    def contents(self) -> dict[str, Any]:
        """The buffer's points in buffer order (task id, step, θ_k, optimizer state, buffers as
        CPU tensors in their recorded dtypes), the ids of their tasks, what each step used
        (``Sample.hypers``, as plain numbers) and the next task id. Costs one copy of the buffer."""
        return {
            "points": [{"task": task_id, **point_to_plain(self.storage.get(point))} for task_id, point in self._points],
            "tasks": sorted(self._tasks),
            "next_id": self._next_id,
            "hypers": {i: {k: to_plain(h) for k, h in steps.items()} for i, steps in self._hypers.items()},
        }

    def restore(self, contents: dict[str, Any], tasks: dict[int, Task], device: torch.device) -> None:
        """Replace the buffer's points by ``contents()`` (recorded again with this buffer's
        settings, on ``device``), their tasks by ``tasks`` (id -> task): all or nothing. The
        generator and the reservoir count are ``load_state_dict``'s."""
        # recorded again as a task's loop records them (warpopt.points), then stored: all or nothing
        points = [point_from_plain(c, device, self.dtype) for c in contents["points"]]
        stored = self.storage.put_many(points)  # the old points are still there
        for _, point in self._points:
            self.storage.release(point)
        self._points = [(int(c["task"]), point) for c, point in zip(contents["points"], stored)]
        self._tasks = {int(i): tasks[int(i)] for i in contents["tasks"]}
        self._hypers = {
            int(i): {int(k): from_plain(h) for k, h in steps.items()}  # type: ignore[misc]
            for i, steps in contents["hypers"].items()
        }
        self._next_id = int(contents["next_id"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._offered = state["offered"]
