"""Is the step replayed the step taken? A sampled check of the task loop (Eq. 7).

Eq. 7 differentiates U(θ_k, ∇L_task(θ_k; φ)), the task optimizer's update as the replay sees
it: the task's loss on one batch, the recorded hyper-parameters and clipping
(``warpopt.step_hypers``). Anything else the loop does to the step (gradients scaled or
clipped by hand, a regulariser in the loop's loss, several batches per step, parameters edited
after ``step()``) is invisible to the replay, which would then differentiate a different step.

The check replays a task's first step and compares it with θ_1 where the loop went on from it
(at the next step, or the task's end), in two halves whose product is U(θ_0, ĝ) ≈ θ_1:

1. the update rule: U applied to the gradients the optimizer was given must land on θ_1
   (relative to the step's size: 1e-3, plus rounding);
2. the gradient: ĝ = clip(∇L_task(θ_k) on the loop's batch), recomputed with the task's loss
   (under a forked RNG: the check changes no random state), must equal the gradients the
   optimizer was given (within 5 % of ‖ĝ‖, which low-precision rounding under
   ``torch.autocast`` stays below). A stochastic model (dropout) gives two recomputations that
   differ: the gradient half then concludes nothing. The loop's batch is known when the loop
   iterates the task (``for x, y in task``); otherwise, and for stochastic models, a
   ``GradGuard`` (free: it compares tensor version counters) reports gradients changed in
   place or replaced between ``backward()`` and ``step()``.

It runs on the first step of tasks 0, 1, 2, 4, 8, ... (about log₂ of the tasks; a forward and
backward each), and the ``GradGuard`` stays on for those tasks' later steps (gradients changed by
hand from some step on: clipping once a condition holds). Each kind of mismatch is reported
once per optimizer, in a warning naming the likely cause.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .clipping import clip_gradients
from .objectives import ReplayContext
from .step_hypers import StepHypers
from .task_optimizers import State

__all__ = ["due", "GradGuard", "Before", "before", "after", "report"]

RTOL_UPDATE = 1e-3
RTOL_GRADIENT = 5e-2


def due(task_index: int) -> bool:
    """Whether the ``task_index``-th task's first step is checked (0, 1, 2, 4, 8, ...)."""
    return task_index & (task_index - 1) == 0


class GradGuard:
    """Notes, after backward accumulates into each parameter's gradient, the gradient's identity
    and version counter (no tensor work); ``changed()`` lists the gradients modified in place or
    replaced since (``torch.nn.utils.clip_grad_norm_``, ``p.grad *= c``, ``p.grad = ...``)."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.seen: dict[int, tuple[int, int]] = {}
        self.handles = [
            p.register_post_accumulate_grad_hook(self._noter(i)) for i, p in enumerate(self.params) if p.requires_grad
        ]

    def _noter(self, i: int) -> Any:
        def note(p: torch.Tensor) -> None:
            self.seen[i] = (id(p.grad), p.grad._version)  # type: ignore[union-attr]

        return note

    def refresh(self) -> None:
        """Accept the gradients as they are now (after warpopt's own recorded clipping)."""
        for i, p in enumerate(self.params):
            if p.grad is not None and i in self.seen:
                self.seen[i] = (id(p.grad), p.grad._version)

    def changed(self) -> list[int]:
        return [
            i
            for i, p in enumerate(self.params)
            if p.grad is not None and self.seen.get(i) != (id(p.grad), p.grad._version)
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@dataclass
class Before:
    """What the checked step starts from: θ_k, its optimizer state, the gradients the optimizer
    is given, the step's recorded hyper-parameters, and what the loop did before the step."""

    params: list[torch.Tensor]
    states: list[State]
    grads: list[torch.Tensor]
    buffers: list[torch.Tensor]
    hypers: StepHypers
    changed: list[int]
    batch: Any
    batches: int


def before(
    params: Sequence[torch.Tensor],
    states: Sequence[State],
    grads: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    hypers: StepHypers,
    guard: GradGuard | None,
    task: Any,
) -> Before:
    """Copies taken just before ``optimizer.step()`` (once per checked task: 3 |θ| copies)."""
    clone = [p.detach().clone() for p in params]
    copied = [{k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in states]
    seen = task.batches_seen()
    return Before(
        clone,
        copied,
        [g.detach().clone() for g in grads],
        [b.detach().clone() for b in buffers],
        hypers,
        guard.changed() if guard is not None else [],
        task.loop_batch(0) if seen == 1 else None,
        seen,
    )


def _norm(ts: Sequence[torch.Tensor]) -> float:
    if not ts:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in ts])))


def _diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return _norm([x.double() - y.double() for x, y in zip(a, b)])


def _gradient(
    context: ReplayContext,
    task: Any,
    params: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    batch: Any,
    hypers: StepHypers,
    seed: int,
) -> list[torch.Tensor]:
    """clip(∇L_task(θ_k) on ``batch``) as the replay computes it, under a forked, seeded RNG."""
    theta = [p.detach().clone().requires_grad_(True) for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)
        loss = task.task_loss(context.forward_at(theta, buffers), batch)
        raw = torch.autograd.grad(loss, theta, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(theta, raw)]
    return clip_gradients(grads, *hypers.clip) if hypers.clip is not None else grads


def after(context: ReplayContext, task: Any, live: Sequence[torch.Tensor], b: Before) -> tuple[str, str] | None:
    """``(kind, message)`` if the step taken differs from the step the replay would take, else
    None. ``live``: θ_1 where the loop went on from it (at its next step, or the task's end)."""
    with torch.no_grad():
        replayed, _ = context.step(b.params, b.grads, b.states, context.hypers_at(b.hypers))
        size = _diff(live, b.params)
        rounding = 8 * max(torch.finfo(p.dtype).eps for p in live) * _norm(live)
        gap = _diff(replayed, live)
    if gap > RTOL_UPDATE * size + rounding:
        return (
            "update",
            f"θ_(k+1) differs from the task optimizer's update of the gradients it was given "
            f"(relative difference {gap / max(size, 1e-30):.2g}): parameters changed after step() "
            "(a weight constraint, an average, a hook), hyper-parameters outside param_groups, or an "
            "optimizer whose step() differs from its registered replay (register_functional_step)",
        )
    if b.batches > 1:
        return (
            "batches",
            f"the loop took {b.batches} batches from the task for one step (gradient accumulation?); "
            "the replay takes one batch per step",
        )
    if b.batch is not None:
        ghat = _gradient(context, task, b.params, b.buffers, b.batch, b.hypers, seed=0)
        scale = _norm(ghat)
        gap = _diff(b.grads, ghat)
        if gap > RTOL_GRADIENT * scale + 1e-30:
            other = _gradient(context, task, b.params, b.buffers, b.batch, b.hypers, seed=1)
            if _diff(other, ghat) <= RTOL_GRADIENT * scale:  # deterministic: a real mismatch
                ratio = _norm(b.grads) / max(scale, 1e-30)
                cause = (
                    "the gradients were changed between backward() and step() (scaled or clipped by hand: for "
                    "clipping by norm call opt.clip_grad_norm_(max_norm), which the replay reproduces)"
                    if b.changed
                    else "the loop's loss is not the task's loss on the loop's batch (a regulariser or another "
                    "criterion in the loop: give it to the task, e.g. batch_loss=)"
                )
                return (
                    "gradient",
                    f"the gradients the optimizer was given differ from the task loss's gradient on "
                    f"the loop's batch (relative difference {gap / max(scale, 1e-30):.2g}, norm ratio "
                    f"{ratio:.3g}): {cause}",
                )
            # a stochastic forward (dropout): the recomputation cannot tell; the guard can
    if b.changed:
        return changed_gradients(b.changed, 0)
    return None


def changed_gradients(changed: Sequence[int], step: int) -> tuple[str, str]:
    """The ``GradGuard``'s finding at step ``step`` of a checked task, as a report."""
    return (
        "gradient",
        f"the gradients of {len(changed)} adapt parameter(s) were changed between backward() "
        f"and step() at step {step} (scaled or clipped by hand: for clipping by norm call "
        "opt.clip_grad_norm_(max_norm), which the replay reproduces; a GradScaler's unscale_ also "
        "shows up here and is harmless)",
    )


def report(kind_message: tuple[str, str] | None, reported: set[str], task: Any) -> None:
    """Warn once per kind of mismatch (per optimizer); kind ``"unchecked"``: the check failed."""
    if kind_message is None or kind_message[0] in reported:
        return
    kind, message = kind_message
    reported.add(kind)
    if kind == "unchecked":
        warnings.warn(
            f"warpopt could not check that the step replayed is the step taken on {task!r} (the check "
            f"failed: {message}); training is unaffected. Reported once.",
            RuntimeWarning,
            stacklevel=5,
        )
        return
    warnings.warn(
        f"warpopt: the step replayed is not the step taken (checked on {task!r}): "
        f"{message}. The exact objective (Eq. 7) differentiates the replayed step, so its meta-gradient "
        "is that of a different step. Reported once.",
        RuntimeWarning,
        stacklevel=5,
    )
