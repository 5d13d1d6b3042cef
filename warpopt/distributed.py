"""Distributed meta-training on ``torch.distributed`` (gloo on CPU, nccl on GPU; works with torchrun).

Each rank adapts (and, offline, replays) its own share of a meta-batch's tasks; every
meta-gradient (φ, learned hyper-parameters and θ0) is all-reduced to its mean across ranks
before the meta-optimizer uses it, so all ranks apply identical updates and hold identical
warp parameters and θ0 throughout (they start identical: ``broadcast_parameters``).

    import torch.distributed as dist, warpopt
    from warpopt import distributed as wd
    dist.init_process_group("gloo")                      # torchrun sets RANK, WORLD_SIZE, ...
    model = warpopt.warp(net)
    opt = warpopt.WarpGradMetaOptimizer(model, reduce=wd.all_reduce_mean(), ...)
    wd.broadcast_parameters(opt)                         # rank 0's φ, θ0, buffers everywhere
    for meta_batch in meta_batches:                      # the same list of tasks on every rank
        for data in wd.rank_tasks(meta_batch):           # this rank's share
            with opt.task(data, loss_fn): ...
        opt.meta_step()

When is this the single-process computation? A mean of per-rank means equals the global mean
when every rank contributes the same number of terms. So with equal splits (the number of
tasks a multiple of the world size, equal steps per task):

- ``online()``: each rank's warp gradient is the mean over its tasks' steps; the all-reduced
  mean is the mean over all tasks' steps: identical to one process running all tasks.
- θ0 learners: each rank's contribution is the mean over its tasks; same argument.
- ``offline(batch_size=η)``: with η ≥ the points in a rank's buffer, one warp update per
  meta-step from all points: identical to one process with η ≥ all points. With a smaller η
  each rank replays its own mini-batches and the all-reduced update averages world-size
  mini-batches (an effective mini-batch of world_size·η drawn per rank): a valid Algorithm 2
  but not the same sample path as one process. Every rank must make the same number of warp
  updates (each is a collective call): equal buffer sizes guarantee it; ``max_updates`` caps it.

Results agree with a single process up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "rank_tasks",
    "all_reduce_mean",
    "broadcast_parameters",
    "broadcast_tensors",
    "backend_for",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a default process group is initialised (else everything here is a no-op)."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: Any | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_tasks(tasks: Sequence[T], *, group: Any | None = None, strict: bool = True) -> list[T]:
    """This rank's share of a meta-batch: tasks ``rank, rank + W, rank + 2W, ...``.

    Every rank must pass the same sequence. With ``strict`` (default) the number of tasks must
    be a multiple of the world size W, so the all-reduced mean equals the single-process mean
    and every rank makes the same number of collective calls; ``strict=False`` allows uneven
    shares (the mean is then over ranks, each rank's tasks weighted 1/(W·its share)).
    """
    tasks = list(tasks)
    r, w = rank(group), world_size(group)
    if strict and len(tasks) % w:
        raise ValueError(
            f"{len(tasks)} tasks cannot be split equally across {w} ranks; use a multiple of "
            f"{w} (or strict=False for uneven shares, which weights tasks unequally)"
        )
    if len(tasks) < w:
        raise ValueError(f"{len(tasks)} tasks for {w} ranks: every rank needs at least one task")
    return tasks[r::w]


def all_reduce_mean(group: Any | None = None) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """A ``reduce=`` function for ``WarpGradMetaOptimizer``: the mean of each gradient across ranks.

    The gradients are packed into one flat buffer per dtype, so a meta-step costs one
    all-reduce per dtype rather than one per tensor. Outside a process group it is the identity.
    """

    def reduce(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if not is_distributed() or not grads:
            return grads
        w = dist.get_world_size(group)
        out: list[torch.Tensor | None] = [None] * len(grads)
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault((g.dtype, g.device), []).append(i)
        for key in sorted(by_dtype, key=str):  # the same order on every rank
            idx = by_dtype[key]
            flat = torch.cat([grads[i].detach().reshape(-1) for i in idx])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(w)
            offset = 0
            for i in idx:
                n = grads[i].numel()
                out[i] = flat[offset : offset + n].view_as(grads[i])
                offset += n
        return out  # type: ignore[return-value]

    return reduce


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0, group: Any | None = None) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one broadcast per tensor)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            data = t.detach()
            if data.is_contiguous():
                dist.broadcast(data, src=src, group=group)
            else:
                tmp = data.contiguous()
                dist.broadcast(tmp, src=src, group=group)
                data.copy_(tmp)


def broadcast_parameters(target: Any, src: int = 0, group: Any | None = None) -> None:
    """Make every rank start from rank ``src``'s state.

    ``target`` is a ``WarpGradMetaOptimizer`` (broadcasts the model's parameters and buffers,
    θ0, the initial buffers and learned hyper-parameters) or an ``nn.Module``. Call it once,
    after building the optimizer and before the first task.
    """
    if isinstance(target, nn.Module):
        broadcast_tensors(list(target.parameters()) + list(target.buffers()), src, group)
        return
    model = getattr(target, "model", None)
    if model is None or not hasattr(target, "theta0"):
        raise TypeError(
            f"broadcast_parameters needs a WarpGradMetaOptimizer or an nn.Module, got {type(target).__name__}"
        )
    tensors = list(model.parameters()) + list(model.buffers()) + list(target.theta0)
    tensors += list(target.initial_buffers) + list(target.learned.values())
    broadcast_tensors(tensors, src, group)
