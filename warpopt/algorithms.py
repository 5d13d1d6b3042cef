"""How warp meta-gradients are collected and applied: Algorithms 1, 2 and 3 (Appendix B).

- ``online()`` (Algorithm 1): at every task step, the meta-gradient at the live θ_k is
  accumulated; ``meta_step()`` applies the average once per meta-batch.
- ``offline(batch_size=η)`` (Algorithm 2, the default): task trajectories go into a replay
  buffer; ``meta_step()`` makes one pass over it in mini-batches of η points drawn without
  replacement, one warp update per mini-batch (η = 1: up to (K+1)·|B| updates per meta-batch,
  θ_K included).
- ``continual(every=η)`` (Algorithm 3): no task resets; meta-gradients accumulate along the
  stream and φ is updated every η task steps, inside ``step()``. With ``objective=None`` the
  meta-gradient is read off the task's own backward pass: the loss of step k+1 evaluated at
  θ_{k+1} = sg[U(θ_k)] is exactly Eq. 8 with L_meta = L_task on the next batch of the stream,
  so it costs nothing extra (the maze experiment's setting).

An algorithm is configuration plus pure functions of an explicit state (optax style):
``init() -> state``; ``on_step(state, grads) -> (state, due)`` where ``due`` is a warp
gradient to apply now (continual) or None; ``flush(state) -> (grads or None, state)`` at
``meta_step()``; inside a task the shell threads a tentative copy of the state through the
steps and keeps it only if the task ends cleanly; offline's ``plan(buffer)`` gives
the mini-batches to replay. Nothing here touches the optimizer; the shell wires the results.

Scaling: every meta-gradient is a *mean* (over a mini-batch, over the steps of a meta-batch,
over η continual steps); the paper's algorithms write sums. For fixed η, K and |B| the two
differ by a constant factor that the meta learning rate absorbs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .objectives import Objective, meta_gradient

__all__ = [
    "Accumulator",
    "accumulate",
    "mean",
    "Algorithm",
    "Online",
    "Offline",
    "Continual",
    "online",
    "offline",
    "continual",
    "THETA0_SCHEDULES",
]

Grads = list[torch.Tensor]
GradientFn = Callable[..., tuple[Grads, torch.Tensor]]


class Accumulator(NamedTuple):
    """A running sum of gradients and the number of terms in it (immutable: see ``accumulate``)."""

    total: tuple[torch.Tensor, ...] | None = None
    count: int = 0


def accumulate(acc: Accumulator, grads: Sequence[torch.Tensor], count: int = 1) -> Accumulator:
    """``acc + grads`` as a new accumulator (out of place: a failed step leaves ``acc`` intact)."""
    grads = tuple(g.detach() for g in grads)
    if acc.total is None:
        return Accumulator(tuple(g.clone() for g in grads), count)
    return Accumulator(tuple(torch._foreach_add(list(acc.total), list(grads))), acc.count + count)


def mean(acc: Accumulator) -> Grads | None:
    """The mean of the accumulated gradients (None when empty)."""
    if acc.total is None or acc.count == 0:
        return None
    return [g / acc.count for g in acc.total]


class Algorithm:
    """Base class. ``resets``: tasks start from θ0; ``records``: trajectories are buffered;
    ``step_objective``: the objective evaluated at each live θ_k (None: none);
    ``harvests``: φ stays trainable during tasks so the task backward fills φ.grad."""

    resets = True
    records = False
    harvests = False

    def step_objective(self, default: Objective) -> Objective | None:
        return None

    def init(self) -> Accumulator:
        return Accumulator()

    def on_step(self, state: Accumulator, grads: Grads | None) -> tuple[Accumulator, Grads | None]:
        return state, None

    def flush(self, state: Accumulator) -> tuple[Grads | None, Accumulator]:
        return None, state

    def pending(self, state: Accumulator) -> bool:
        return state.count > 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Online(Algorithm):
    """Algorithm 1: accumulate ∇L(φ; θ_k) during adaptation, one warp update per meta-batch.

    State: the ``Accumulator`` of the per-step meta-gradients of the meta-batch's tasks.
    """

    def step_objective(self, default: Objective) -> Objective | None:
        return default

    def on_step(self, state: Accumulator, grads: Grads | None) -> tuple[Accumulator, Grads | None]:
        return (state if grads is None else accumulate(state, grads)), None

    def flush(self, state: Accumulator) -> tuple[Grads | None, Accumulator]:
        return mean(state), Accumulator()


THETA0_SCHEDULES = ("meta_step", "mini_batch")


@dataclass(repr=False)
class Offline(Algorithm):
    """Algorithm 2: replay buffered (τ, θ_k) in mini-batches of η without replacement.

    Args:
        batch_size: η, points per warp update (the Omniglot default is 1).
        epochs: passes over the buffer per ``meta_step``.
        max_updates: cap on warp updates per ``meta_step`` (None: every mini-batch).
        gradient: ``gradient(objective, context, samples, meta_params) -> (grads, loss)`` of a
            mini-batch (default: the per-sample loop; ``warpopt.vectorised.vectorised()``).
        theta0: when θ0 moves. ``"meta_step"`` (default, as the original implementation):
            once, after all warp updates, with the mean of the tasks' contributions.
            ``"mini_batch"`` (Algorithm 2, line 20): together with φ after every mini-batch,
            each point (τ, k) bringing its share C_τ / (n_τ |B|) of its task's contribution
            (n_τ: the task's points in the buffer), so one full pass applies the same total;
            Algorithm 2 attributes to each point its own term ∇C(θ0; θ_{0:k}) instead, which
            would cost one more |θ|-sized tensor per recorded point. The default keeps θ0 fixed
            while φ is fitted to the trajectories θ0 produced.
    """

    batch_size: int = 1
    epochs: int = 1
    max_updates: int | None = None
    gradient: GradientFn = meta_gradient
    theta0: str = "meta_step"

    records = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or (self.max_updates is not None and self.max_updates < 1):
            raise ValueError("offline(): batch_size, epochs and max_updates must be >= 1")
        if self.theta0 not in THETA0_SCHEDULES:
            raise ValueError(f"offline(theta0=...) must be one of {THETA0_SCHEDULES}, got {self.theta0!r}")

    def plan(self, buffer: Any) -> list[list[int]]:
        """The mini-batches of buffer indices to replay, in order (draws the buffer's generator)."""
        batches: list[list[int]] = []
        for _ in range(self.epochs):
            batches.extend(buffer.order(self.batch_size))
        return batches if self.max_updates is None else batches[: self.max_updates]

    def pending(self, state: Accumulator) -> bool:
        return False  # the buffer itself says whether there is anything to replay


class Continual(Algorithm):
    """Algorithm 3: no resets; update φ every η task steps with the accumulated meta-gradient.

    Args:
        every: η, task steps per warp update (the maze experiment uses 30).
        objective: an objective evaluated at each live θ_k on the current task's data; None
            (default) harvests Eq. 8 from the task backward pass (see module docstring).

    State: the ``Accumulator`` of the steps since the last warp update (with harvesting, the
    shell passes each step's harvested φ.grad).
    """

    resets = False

    def __init__(self, every: int = 30, objective: Objective | None = None) -> None:
        if every < 1:
            raise ValueError(f"continual(): every must be >= 1, got {every}")
        self.every, self.objective = every, objective
        self.harvests = objective is None

    def step_objective(self, default: Objective) -> Objective | None:
        return self.objective

    def on_step(self, state: Accumulator, grads: Grads | None) -> tuple[Accumulator, Grads | None]:
        if grads is None:
            raise ValueError("continual(): every task step needs a meta-gradient")
        state = accumulate(state, grads)
        if state.count < self.every:
            return state, None
        return Accumulator(), mean(state)

    def pending(self, state: Accumulator) -> bool:
        return False  # updates happen inside step()


def online() -> Online:
    return Online()


def offline(
    batch_size: int = 1,
    epochs: int = 1,
    max_updates: int | None = None,
    gradient: GradientFn = meta_gradient,
    theta0: str = "meta_step",
) -> Offline:
    """Algorithm 2; ``gradient(objective, context, samples, meta_params)`` computes each
    mini-batch's meta-gradient (default: per-sample loop; see ``warpopt.vectorised``)."""
    return Offline(batch_size, epochs, max_updates, gradient, theta0)


def continual(every: int = 30, objective: Objective | None = None) -> Continual:
    return Continual(every, objective)
