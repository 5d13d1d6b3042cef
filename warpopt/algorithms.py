"""How warp meta-gradients are collected and applied: Algorithms 1, 2 and 3 (Appendix B).

- ``online()`` (Algorithm 1): at every task step, the meta-gradient at the live θ_k is
  accumulated; ``meta_step()`` applies the average once per meta-batch.
- ``offline(batch_size=η)`` (Algorithm 2, the default): task trajectories go into a replay
  buffer; ``meta_step()`` makes one pass over it in mini-batches of η points drawn without
  replacement, one warp update per mini-batch (η = 1: up to K·|B| updates per meta-batch).
- ``continual(every=η)`` (Algorithm 3): no task resets; meta-gradients accumulate along the
  stream and φ is updated every η task steps, inside ``step()``. With ``objective=None`` the
  meta-gradient is read off the task's own backward pass: the loss of step k+1 evaluated at
  θ_{k+1} = sg[U(θ_k)] is exactly Eq. 8 with L_meta = L_task on the next batch of the stream,
  so it costs nothing extra (the maze experiment's setting).

The θ0 meta-learner's contributions are averaged over the tasks of the meta-batch and applied
once per ``meta_step()`` in every algorithm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .objectives import Objective, meta_gradient
from .trajectory import TaskRun

if TYPE_CHECKING:  # pragma: no cover
    from .meta_optimizer import WarpGradMetaOptimizer

__all__ = ["Algorithm", "Online", "Offline", "Continual", "online", "offline", "continual"]


def _accumulate(total: Optional[list[torch.Tensor]], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    if total is None:
        return grads
    torch._foreach_add_(total, grads)
    return total


class Algorithm:
    """Base class. ``resets``: tasks start from θ0; ``records``: trajectories are buffered;
    ``harvests``: warp parameters stay trainable during tasks so the task backward fills φ.grad."""

    resets = True
    records = False
    harvests = False

    def before_update(self, opt: "WarpGradMetaOptimizer", run: Optional[TaskRun]) -> None:
        """At θ_k, before the task update (the task gradient is in ``.grad``)."""

    def after_update(self, opt: "WarpGradMetaOptimizer", run: Optional[TaskRun]) -> None:
        """At θ_{k+1}, after the task update."""

    def end_task(self, opt: "WarpGradMetaOptimizer", run: TaskRun) -> None:
        """The task ended cleanly: commit what was collected."""

    def meta_step(self, opt: "WarpGradMetaOptimizer") -> dict[str, Any]:
        """Apply the warp update(s); return statistics."""
        return {}

    def pending(self) -> bool:
        """Whether collected meta-gradient data awaits ``meta_step``."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Online(Algorithm):
    """Algorithm 1: accumulate ∇L(φ; θ_k) during adaptation, one warp update per meta-batch."""

    def __init__(self) -> None:
        self._sum: Optional[list[torch.Tensor]] = None
        self._count = 0

    def before_update(self, opt: "WarpGradMetaOptimizer", run: Optional[TaskRun]) -> None:
        assert run is not None
        sample = run.sample(opt.current_states())
        with opt.warp_trainable():
            grads, _ = meta_gradient(opt.objective, run.context, [sample], opt.meta_parameters())
        run.meta_grads = _accumulate(run.meta_grads, grads)
        run.meta_count += 1

    def end_task(self, opt: "WarpGradMetaOptimizer", run: TaskRun) -> None:
        if run.meta_grads is not None:
            self._sum = _accumulate(self._sum, run.meta_grads)
            self._count += run.meta_count

    def pending(self) -> bool:
        return self._count > 0

    def meta_step(self, opt: "WarpGradMetaOptimizer") -> dict[str, Any]:
        if self._sum is None:
            return {"warp_updates": 0}
        grads = [g / self._count for g in self._sum]
        opt.apply_warp_gradients(grads)
        self._sum, self._count = None, 0
        return {"warp_updates": 1}

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum, self._count = state["sum"], state["count"]


class Offline(Algorithm):
    """Algorithm 2: replay buffered (τ, θ_k) in mini-batches of η without replacement.

    Args:
        batch_size: η, points per warp update (the Omniglot default is 1).
        epochs: passes over the buffer per ``meta_step``.
        max_updates: cap on warp updates per ``meta_step`` (None: every mini-batch).
    """

    records = True

    def __init__(self, batch_size: int = 1, epochs: int = 1, max_updates: Optional[int] = None,
                 gradient: Callable[..., tuple[list[torch.Tensor], torch.Tensor]] = meta_gradient) -> None:
        if batch_size < 1 or epochs < 1 or (max_updates is not None and max_updates < 1):
            raise ValueError("offline(): batch_size, epochs and max_updates must be >= 1")
        self.batch_size, self.epochs, self.max_updates = batch_size, epochs, max_updates
        self.gradient = gradient

    def end_task(self, opt: "WarpGradMetaOptimizer", run: TaskRun) -> None:
        assert run.trajectory is not None
        opt.replay.commit(run.trajectory)

    def pending(self) -> bool:
        return False  # the buffer itself says whether there is anything to replay

    def meta_step(self, opt: "WarpGradMetaOptimizer") -> dict[str, Any]:
        buffer = opt.replay
        context = opt.replay_context()
        updates, losses = 0, []
        for _ in range(self.epochs):
            for batch in buffer.batches(self.batch_size, opt.device):
                with opt.warp_trainable():
                    grads, loss = self.gradient(opt.objective, context, batch, opt.meta_parameters())
                opt.apply_warp_gradients(grads)
                losses.append(loss)
                updates += 1
                if self.max_updates is not None and updates >= self.max_updates:
                    break
            if self.max_updates is not None and updates >= self.max_updates:
                break
        buffer.clear()
        mean = torch.stack(losses).mean().item() if losses else float("nan")
        return {"warp_updates": updates, "meta_loss": mean}


class Continual(Algorithm):
    """Algorithm 3: no resets; update φ every η task steps with the accumulated meta-gradient.

    Args:
        every: η, task steps per warp update (the maze experiment uses 30).
        objective: an objective evaluated at each live θ_k on the current task's data; None
            (default) harvests Eq. 8 from the task backward pass (see module docstring).
    """

    resets = False

    def __init__(self, every: int = 30, objective: Optional[Objective] = None) -> None:
        if every < 1:
            raise ValueError(f"continual(): every must be >= 1, got {every}")
        self.every, self.objective = every, objective
        self.harvests = objective is None
        self._sum: Optional[list[torch.Tensor]] = None
        self._count = 0

    def before_update(self, opt: "WarpGradMetaOptimizer", run: Optional[TaskRun]) -> None:
        if self.harvests:
            return
        if run is None:
            raise RuntimeError("continual(objective=...) needs the task's data: step inside `with opt.task(...)`")
        with opt.warp_trainable():
            grads, _ = meta_gradient(self.objective, run.context, [run.sample(opt.current_states())],
                                     opt.meta_parameters())
        self._sum = _accumulate(self._sum, grads)

    def after_update(self, opt: "WarpGradMetaOptimizer", run: Optional[TaskRun]) -> None:
        self._count += 1
        if self._count < self.every:
            return
        params = opt.meta_parameters()
        if self.harvests:
            grads = [p.grad / self._count if p.grad is not None else torch.zeros_like(p) for p in params]
            for p in params:
                p.grad = None
        else:
            assert self._sum is not None
            grads = [g / self._count for g in self._sum]
        self._sum, self._count = None, 0
        opt.apply_warp_gradients(grads)

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum, self._count = state["sum"], state["count"]


def online() -> Online:
    return Online()


def offline(batch_size: int = 1, epochs: int = 1, max_updates: Optional[int] = None,
            gradient: Callable[..., tuple[list[torch.Tensor], torch.Tensor]] = meta_gradient) -> Offline:
    """Algorithm 2; ``gradient(objective, context, samples, meta_params)`` computes each
    mini-batch's meta-gradient (default: per-sample loop; see ``warpopt.vectorised``)."""
    return Offline(batch_size, epochs, max_updates, gradient)


def continual(every: int = 30, objective: Optional[Objective] = None) -> Continual:
    return Continual(every, objective)
