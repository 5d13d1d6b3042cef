"""The meta update: replay, reduce, apply (the outer loop of Algorithms 1-3, Eq. 9).

``MetaParameters`` holds what is meta-learned and how it moves: φ (with learned task
hyper-parameters) under one meta optimizer, θ0 under another, so neither gradient is ever
nulled by hand. ``meta_update`` is one ``meta_step()``: warp updates as the algorithm says,
then θ0. ``transaction`` makes it all-or-nothing: any exception (a warp update, the θ0
update, a ``reduce=`` hook, a user hook, KeyboardInterrupt) puts every piece of meta state
back, so a retry is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .algorithms import Accumulator, Algorithm, Offline, accumulate, mean
from .objectives import Objective
from .partition import Model
from .task_optimizers import copy_state_dict
from .trajectory import ReplayBuffer

__all__ = ["MetaParameters", "Contributions", "add_contribution", "meta_update", "transaction", "check_rate"]

Grads = list[torch.Tensor]
Reduce = Callable[[Grads], Grads]


def check_rate(name: str, value: Any) -> None:
    """Learning rates must be finite and >= 0 (as torch.optim requires of lr)."""
    if isinstance(value, torch.Tensor):
        value = float(value.detach())
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _finite(grads: Sequence[torch.Tensor]) -> bool:
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(list(grads))).sum()))


def _precision_hint(params: Sequence[torch.Tensor]) -> str:
    """Why a float16 model's meta-update goes NaN/inf: Adam's default eps (1e-8) is 0 in float16,
    so entries with a zero second moment divide 0 by 0 (torch.optim's behaviour, not a bad loss)."""
    if not any(p.dtype == torch.float16 for p in params):
        return ""
    return (
        "; the model is in float16, where Adam's default eps=1e-8 rounds to 0: keep the model in "
        "float32 under torch.autocast, or pass meta_optimizer=functools.partial(torch.optim.Adam, eps=1e-4)"
    )


@dataclass
class MetaParameters:
    """φ (+ learned hyper-parameters) and θ0 with their meta optimizers (None: not learned)."""

    warp: list[nn.Parameter]
    learned: dict[str, nn.Parameter]
    theta0: list[nn.Parameter]
    warp_optimizer: torch.optim.Optimizer | None
    init_optimizer: torch.optim.Optimizer | None
    reduce: Reduce
    on_nonfinite: str = "raise"
    learned_clip: float | None = None

    @staticmethod
    def build(
        core: Model,
        meta_optimizer: Callable[..., torch.optim.Optimizer],
        meta_lr: float,
        init_lr: float,
        learned_lr: float,
        learns_theta0: bool,
        reduce: Reduce | None,
        on_nonfinite: str,
        learned_clip: float | None,
    ) -> MetaParameters:
        """One meta optimizer over φ (group "warp") and learned hyper-parameters (group
        "learned"), another over θ0 (group "initialisation", learning rate λβ)."""
        groups = ([{"params": core.warp, "lr": meta_lr, "name": "warp"}] if core.warp else []) + (
            [{"params": list(core.learned.values()), "lr": learned_lr, "name": "learned"}] if core.learned else []
        )
        theta0 = [{"params": core.theta0, "lr": init_lr, "name": "initialisation"}]
        return MetaParameters(
            core.warp,
            core.learned,
            core.theta0,
            meta_optimizer(groups) if groups else None,
            meta_optimizer(theta0) if learns_theta0 else None,
            reduce if reduce is not None else (lambda grads: grads),
            on_nonfinite,
            learned_clip,
        )

    @property
    def phi(self) -> list[nn.Parameter]:
        return self.warp + list(self.learned.values())

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.warp_optimizer, self.init_optimizer) if o is not None]

    def _check(self, what: str, ok: bool) -> bool:
        if ok:
            return True
        message = f"the {what} is NaN/inf: check the task and meta losses and the learning rates"
        message += _precision_hint(self.phi + self.theta0)
        if self.on_nonfinite == "skip":
            warnings.warn(message + "; this update was skipped (on_nonfinite='skip')", RuntimeWarning, stacklevel=4)
            return False
        raise FloatingPointError(message + " (pass on_nonfinite='skip' to skip such updates)")

    def apply_phi(self, grads: Grads) -> bool:
        """φ ← meta-optimizer step with gradient ``grads`` (aligned with ``phi``); False if skipped."""
        assert self.warp_optimizer is not None
        for group in self.warp_optimizer.param_groups:
            check_rate(f"meta_lr (param group {group.get('name', '?')!r})", group["lr"])
        grads = self.reduce(list(grads))
        if not self._check("warp meta-gradient", _finite(grads)):
            return False
        for p, g in zip(self.phi, grads):
            p.grad = g.to(p.dtype)
        if self.learned and self.learned_clip is not None:
            for p in self.learned.values():
                p.grad.clamp_(-self.learned_clip, self.learned_clip)  # type: ignore[union-attr]
        self.warp_optimizer.step()
        for p in self.phi:
            p.grad = None
        return True

    def apply_theta0(self, grads: Grads) -> bool:
        """θ0 ← meta-optimizer step (learning rate λβ); False if skipped."""
        assert self.init_optimizer is not None
        for group in self.init_optimizer.param_groups:
            check_rate("init_lr", group["lr"])
        grads = self.reduce(list(grads))
        if not self._check("θ0 meta-gradient", _finite(grads)):
            return False
        for p, g in zip(self.theta0, grads):
            p.grad = g.to(p.dtype)
        self.init_optimizer.step()
        for p in self.theta0:
            p.grad = None
        if not _finite([p.detach() for p in self.theta0]):  # cannot be skipped: the transaction undoes it
            raise FloatingPointError(
                "θ0 became NaN/inf after an update with a finite meta-gradient: lower init_lr"
                + _precision_hint(self.theta0)
                + "; the meta-step was undone"
            )
        return True

    def snapshot(self) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        values = [p.detach().clone() for p in self.phi + self.theta0]
        return values, [copy_state_dict(o.state_dict()) for o in self.optimizers()]

    def restore(self, snap: tuple[list[torch.Tensor], list[dict[str, Any]]]) -> None:
        values, states = snap
        with torch.no_grad():
            for p, v in zip(self.phi + self.theta0, values):
                p.copy_(v)
                p.grad = None
        for o, s in zip(self.optimizers(), states):
            o.load_state_dict(s)


class Contributions(NamedTuple):
    """The θ0 meta-gradients of the meta-batch's tasks: their running sum, and (for
    ``offline(theta0="mini_batch")``) each task's own, keyed by its replay-buffer id."""

    total: Accumulator = Accumulator()
    by_task: tuple[tuple[int, tuple[torch.Tensor, ...]], ...] = ()


def add_contribution(c: Contributions, grads: Sequence[torch.Tensor], task_id: int | None) -> Contributions:
    by_task = (*c.by_task, (task_id, tuple(grads))) if task_id is not None else c.by_task
    return Contributions(accumulate(c.total, grads), by_task)


def meta_update(
    meta: MetaParameters,
    model: Model,
    algorithm: Algorithm,
    state: Accumulator,
    contributions: Contributions,
    replay: ReplayBuffer,
    objective: Objective,
    device: torch.device,
) -> tuple[dict[str, Any], Accumulator]:
    """One meta step (Eq. 9): warp updates per ``algorithm``, then θ0. Returns the statistics
    and the algorithm's next state. Mutates φ, θ0 and their optimizers: run it in a
    ``transaction``."""
    updates, losses = 0, []
    per_batch = isinstance(algorithm, Offline) and algorithm.theta0 == "mini_batch" and contributions.by_task
    applied: dict[int, float] = {}
    if isinstance(algorithm, Offline) and len(replay):
        context = model.context()
        by_task, points, tasks = dict(contributions.by_task), replay.task_points(), contributions.total.count
        for indices in algorithm.plan(replay):
            samples = [replay.sample(i, device) for i in indices]
            if meta.phi:
                grads, loss = algorithm.gradient(objective, context, samples, meta.phi)
                updates += meta.apply_phi(grads)
                losses.append(loss)
            if per_batch:  # Algorithm 2, line 20: θ0 moves with φ, by the sampled points' shares
                share = [torch.zeros_like(t) for t in meta.theta0]
                for s in samples:
                    if s.task_id in by_task:
                        torch._foreach_add_(share, list(by_task[s.task_id]), alpha=1.0 / (points[s.task_id] * tasks))
                        applied[s.task_id] = applied.get(s.task_id, 0.0) + 1.0 / points[s.task_id]
                meta.apply_theta0(share)
    elif not isinstance(algorithm, Offline):
        flushed, state = algorithm.flush(state)
        if flushed is not None and meta.phi:
            updates += meta.apply_phi(flushed)
    if meta.init_optimizer is not None and contributions.total.count:
        if per_batch:  # what the replayed mini-batches did not apply (tasks without points, max_updates)
            rest = [torch.zeros_like(t) for t in meta.theta0]
            for task_id, task_grads in contributions.by_task:
                left = 1.0 - applied.get(task_id, 0.0)
                if left > 1e-9:
                    torch._foreach_add_(rest, list(task_grads), alpha=left / contributions.total.count)
            if any(task_id not in applied or applied[task_id] < 1 - 1e-9 for task_id, _ in contributions.by_task):
                meta.apply_theta0(rest)
        else:
            meta.apply_theta0(mean(contributions.total))  # type: ignore[arg-type]
    meta_loss = torch.stack(losses).mean().item() if losses else float("nan")
    return {"warp_updates": updates, "meta_loss": meta_loss}, state


@contextlib.contextmanager
def transaction(
    meta: MetaParameters, replay: ReplayBuffer, extra: Any, restore_extra: Callable[[Any], None]
) -> Iterator[None]:
    """All or nothing: on any exception, φ, θ0, both meta optimizers, the replay buffer's
    generator, the global torch RNG and ``extra`` (the shell's own state) are restored."""
    snap = meta.snapshot()
    replay_state = replay.state_dict()
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    except BaseException:
        meta.restore(snap)
        replay.load_state_dict(replay_state)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        restore_extra(extra)
        raise
