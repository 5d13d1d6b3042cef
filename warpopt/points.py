"""Recorded points θ_k of a task trajectory, flattened for storage (Section 2.4, Algorithm 2).

A point holds θ_k, the task optimizer's state at θ_k (momentum buffers, Adam moments and step
counts, needed to replay the user's update rule exactly) and the adaptable buffers (BatchNorm
statistics). It is stored as one flat vector per storage dtype: a single ``torch.cat`` per dtype
and step, on the parameters' device, no host round trip. Every tensor keeps its own dtype unless
the caller asks for a lower storage precision for parameters and moments (``dtype=``); step
counts and non-floating tensors (integer buffers) are never cast, so a model mixing float32 and
float64 parameters, or an int64 counter above 2⁵³, replays bit-exactly.

The vectors come from an ``Arena`` when one is given: flat tensors allocated once and handed out
again after their point is released, so recording a step writes into memory the process already
owns (a fresh |θ|-sized tensor per step costs page faults on CPU and allocator traffic on GPU).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Arena",
    "Point",
    "State",
    "flatten_point",
    "param_views",
    "point_from_plain",
    "point_to_plain",
    "unflatten_point",
]

State = dict[str, torch.Tensor]

HOST = -1  # vector index of a step count kept on the host as a Python number


def _storage_dtype(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype ``t`` is stored in, or ``None`` for a host-side number.

    Step counts drive Adam's bias correction and integer buffers count batches: a cast of
    either would change the replayed update, so they keep their dtype. Step counts the
    optimizer keeps on the host (torch.optim's default) stay there as Python numbers:
    copying them to a GPU would synchronise at every step.
    """
    if key == "step" and t.device.type == "cpu" and t.numel() == 1:
        return None
    if dtype is None or key == "step" or not t.is_floating_point():
        return t.dtype
    return dtype


@dataclass(frozen=True)
class _Layout:
    """Where each tensor of a point lives.

    ``dtypes[g]`` is the dtype of the point's g-th flat vector; ``entries`` holds, per tensor in
    recording order (parameters, then each parameter's optimizer state, then buffers), the
    vector index (``HOST`` for a host-side number), offset, numel, shape and original dtype.
    """

    state_keys: tuple[tuple[str, ...], ...]  # per parameter, the optimizer-state keys
    dtypes: tuple[torch.dtype, ...]
    entries: tuple[tuple[int, int, int, torch.Size, torch.dtype], ...]

    @staticmethod
    def of(
        tensors: Sequence[tuple[str, torch.Tensor]],
        state_keys: tuple[tuple[str, ...], ...],
        dtype: torch.dtype | None = None,
    ) -> _Layout:
        groups: dict[torch.dtype, int] = {}
        sizes: list[int] = []
        host = 0
        entries = []
        for key, t in tensors:
            store = _storage_dtype(key, t, dtype)
            if store is None:
                entries.append((HOST, host, 1, t.shape, t.dtype))
                host += 1
                continue
            if store not in groups:
                groups[store] = len(groups)
                sizes.append(0)
            g = groups[store]
            entries.append((g, sizes[g], t.numel(), t.shape, t.dtype))
            sizes[g] += t.numel()
        return _Layout(state_keys, tuple(groups), tuple(entries))


@dataclass
class Point:
    """A recorded θ_k: one flat vector per storage dtype, host-side step counts, their layout.

    ``vectors`` are on the recording device, in CPU memory or, for a point stored on disk
    (``path`` set), empty ``meta`` tensors that keep the shapes and dtypes of the file's content.
    """

    step: int
    vectors: tuple[torch.Tensor, ...]
    layout: _Layout
    path: str | None = None  # set when the vectors live on disk
    host: tuple[float, ...] = ()

    def nbytes(self) -> int:
        """Bytes held in memory (0 for a point on disk)."""
        return sum(v.numel() * v.element_size() for v in self.vectors if v.device.type != "meta")


def _storage_count(t: torch.Tensor) -> int | None:
    """How many tensors hold ``t``'s memory (None where torch does not say)."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return None
    return counter(t.untyped_storage()._cdata)


class Arena:
    """Flat vectors for recorded points, allocated once and reused (one free list per
    device, dtype and length).

    ``take`` hands out a vector: a released one when there is one that nothing else still
    holds (a view kept by a caller, e.g. a ``Sample`` from ``ReplayBuffer.sample``, makes it
    unavailable: it is dropped and a new one allocated, so memory a caller holds never
    changes), else a new one. ``give_back`` returns vectors this arena made; anything else is
    ignored. The memory stays with the arena between meta-steps; ``clear`` lets it go.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[torch.device, torch.dtype, int], list[torch.Tensor]] = {}
        self._owned: dict[int, weakref.ref] = {}
        self._alone = _storage_count(torch.empty(1))  # the count of a vector nobody else holds

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((device, dtype, numel))
        while free:
            vector = free.pop()
            if self._alone is not None and _storage_count(vector) == self._alone:
                return vector
            self._owned.pop(id(vector), None)  # still viewed by someone: theirs now
        vector = torch.empty(numel, dtype=dtype, device=device)
        self._owned[id(vector)] = weakref.ref(vector)
        return vector

    def give_back(self, vectors: Iterable[torch.Tensor]) -> None:
        for v in vectors:
            ref = self._owned.get(id(v))
            if ref is not None and ref() is v:
                self._free.setdefault((v.device, v.dtype, v.numel()), []).append(v)

    def nbytes(self) -> int:
        """Bytes held in free vectors (memory kept for the next recordings)."""
        return sum(v.numel() * v.element_size() for free in self._free.values() for v in free)

    def clear(self) -> None:
        """Let the free vectors go (vectors still in points stay valid)."""
        self._free.clear()
        self._owned = {k: r for k, r in self._owned.items() if r() is not None}

    def __getstate__(self) -> dict[str, Any]:  # weak references do not pickle: a copy starts empty
        return {"_free": {}, "_owned": {}, "_alone": self._alone}


def flatten_point(
    step: int,
    params: Sequence[torch.Tensor],
    states: Sequence[State],
    buffers: Sequence[torch.Tensor],
    dtype: torch.dtype | None = None,
    arena: Arena | None = None,
) -> Point:
    """Copy θ_k, its optimizer state and buffers into one flat vector per storage dtype.

    ``dtype`` (e.g. ``torch.float16``) is the storage precision of floating parameters, moments
    and buffers; ``None`` keeps each tensor's own dtype. ``arena``: where the vectors come from
    (default: freshly allocated). Nothing here waits for the device: device tensors are copied
    on the device, host-side step counts are read on the host.
    """
    items: list[tuple[str, torch.Tensor]] = [("param", p) for p in params]
    for s in states:
        items.extend(s.items())
    items.extend(("buffer", b) for b in buffers)
    layout = _Layout.of(items, tuple(tuple(s.keys()) for s in states), dtype)
    parts: list[list[torch.Tensor]] = [[] for _ in layout.dtypes]
    host = []
    for (_, t), (g, *_rest) in zip(items, layout.entries):
        if g == HOST:
            host.append(t.item())
        else:
            parts[g].append(t.detach().reshape(-1))
    vectors = []
    for g, group in enumerate(parts):
        store = layout.dtypes[g]
        if arena is None:
            vectors.append(torch.cat([t.to(store) for t in group]))
            continue
        out = arena.take(sum(t.numel() for t in group), store, group[0].device)
        if all(t.dtype == store for t in group):
            torch.cat(group, out=out)  # one kernel, into memory the arena already holds
        else:  # a cast on the way in (half-precision storage): tensor by tensor, still no allocation
            offset = 0
            for t in group:
                out[offset : offset + t.numel()].copy_(t)
                offset += t.numel()
        vectors.append(out)
    return Point(step, tuple(vectors), layout, host=tuple(host))


def unflatten_point(point: Point, device: torch.device) -> tuple[list[torch.Tensor], list[State], list[torch.Tensor]]:
    """Inverse of ``flatten_point``: tensors on ``device`` in their recorded dtypes.

    Host-side step counts come back as 0-dim CPU tensors, where the task optimizer kept them.
    """
    vectors = [v.to(device, non_blocking=True) for v in point.vectors]
    tensors = []
    for g, offset, numel, shape, dtype in point.layout.entries:
        if g == HOST:
            tensors.append(torch.tensor(point.host[offset], dtype=dtype).view(shape))
        else:
            tensors.append(vectors[g][offset : offset + numel].view(shape).to(dtype))
    n_params = len(point.layout.state_keys)
    params, rest = tensors[:n_params], iter(tensors[n_params:])
    states = [{key: next(rest) for key in keys} for keys in point.layout.state_keys]
    return params, states, list(rest)


def point_to_plain(point: Point) -> dict[str, Any]:
    """A checkpoint's form of ``point``: its step and θ_k, optimizer state and buffers as CPU
    tensors (copies) in their recorded dtypes (``torch.load(weights_only=True)`` reads it)."""
    params, states, buffers = unflatten_point(point, torch.device("cpu"))
    return {
        "step": point.step,
        "params": [p.clone() for p in params],
        "states": [{k: v.clone() for k, v in st.items()} for st in states],
        "buffers": [b.clone() for b in buffers],
    }


def point_from_plain(
    plain: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None, arena: Arena | None = None
) -> Point:
    """Inverse of ``point_to_plain``: the point recorded again on ``device`` (host-side step
    counts, 0-dim, stay on the host), with storage ``dtype`` and ``arena`` as ``flatten_point``."""
    return flatten_point(
        int(plain["step"]),
        [p.to(device) for p in plain["params"]],
        [{k: v.to(device) if v.dim() else v for k, v in st.items()} for st in plain["states"]],
        [b.to(device) for b in plain["buffers"]],
        dtype,
        arena,
    )


def param_views(point: Point) -> list[torch.Tensor] | None:
    """θ_k of ``point`` as views of its vectors (no copy), or None where the point does not hold
    the parameters exactly as they were: stored in a lower precision, on disk, or on the host.

    The views alias the recorded memory: read them, never write them.
    """
    views = []
    for g, offset, numel, shape, dtype in point.layout.entries[: len(point.layout.state_keys)]:
        if g == HOST:
            return None
        vector = point.vectors[g]
        if vector.dtype != dtype or vector.device.type == "meta":
            return None
        views.append(vector[offset : offset + numel].view(shape))
    return views
