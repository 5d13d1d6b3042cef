"""Meta-learners of the initialisation θ0: the C(θ0) term of J = L(φ) + λ C(θ0) (Eq. 9).

Each learner turns one adapted task into a gradient contribution for θ0; the meta-optimizer
averages contributions over the tasks of a meta-batch and applies them with learning rate
λβ. A learner is configuration plus three functions of an explicit per-task state
(optax style; all optional to override):

- ``begin_task(view) -> state``: the task starts at θ0 (``view.params`` hold θ0).
- ``after_step(state, view, previous, grads) -> state``: θ_{k-1} = ``previous``, its task
  gradient ``grads``, θ_k = ``view.params`` (live), k = ``view.steps``.
- ``end_task(state, view) -> list[Tensor] | None``: ∇C(θ0) for this task (None: none).

``view`` is the task's read-only view (``warpopt.session.TaskView``): ``task``, ``context``
(a ``ReplayContext``), live ``params``/``buffers``, the start ``theta0``/``start_buffers``
and ``steps``. A learner keeps nothing between calls except what it returns.
Subclass ``InitialisationLearner`` to plug in your own.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, Sequence

import torch

from .objectives import ReplayContext
from .tasks import Task

__all__ = ["InitialisationLearner", "Leap", "LeapState", "Reptile", "FOMAML", "MAML", "MultiTask",
           "NoInitialisation", "TaskView", "leap", "reptile", "fomaml", "maml", "multitask", "none"]

Tensors = list[torch.Tensor]


class TaskView(Protocol):
    """What a θ0 learner may read of a task while it adapts."""

    task: Task
    context: ReplayContext
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    theta0: list[torch.Tensor]
    start_buffers: list[torch.Tensor]
    steps: int


class InitialisationLearner:
    """Base class: a fixed θ0 (no contribution); tasks start from θ0."""

    #: whether ``after_step`` needs θ_{k-1} (costs one parameter copy per step)
    needs_previous: bool = False
    #: whether θ0 is meta-learned at all
    learns: bool = True

    def begin_task(self, view: TaskView) -> Any:
        return None

    def after_step(self, state: Any, view: TaskView, previous: Sequence[torch.Tensor],
                   grads: Sequence[torch.Tensor]) -> Any:
        return state

    def end_task(self, state: Any, view: TaskView) -> Optional[Tensors]:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoInitialisation(InitialisationLearner):
    """θ0 is a fixed random initialisation, never meta-learned (λC(θ0) = 0; Appendix G, J)."""

    learns = False


class LeapState(NamedTuple):
    """Leap's per-task state: the running meta-gradient, the probe batch and L(θ_{k-1}) on it."""

    grad: Tensors
    probe: Any = None
    loss: Optional[torch.Tensor] = None


class Leap(InitialisationLearner):
    """Leap (Flennerhag et al., 2019): shorten the trajectory's length in (θ, L) space (Eq. 10).

    With ϑ_k = (θ_k, L_task(θ_k)), Δθ_k = θ_k − θ_{k-1} and ΔL_k = L(θ_k) − L(θ_{k-1}), the
    first-order meta-gradient is Eq. 13:

        ∇C_Leap(θ0) ≈ − Σ_k (ΔL_k ∇L(θ_{k-1}) + Δθ_k) / ‖ϑ_k − ϑ_{k-1}‖₂.

    ∇L(θ_{k-1}) is the task gradient of the step the user took; L(θ_k) is evaluated on one
    probe batch of the task's data drawn at the start of the task (a forward pass per step),
    so that ΔL_k measures the change of one function rather than batch-to-batch noise.

    Args:
        loss_term: include the loss coordinate of ϑ (Eq. 10); False gives the pure
            parameter-space path length.
    """

    needs_previous = True

    def __init__(self, loss_term: bool = True) -> None:
        self.loss_term = loss_term

    @staticmethod
    def _probe_loss(view: TaskView, probe: Any) -> torch.Tensor:
        forward = view.context.forward_at([p.detach() for p in view.params], view.buffers)
        with torch.no_grad():
            return view.task.task_loss(forward, probe).detach()

    def begin_task(self, view: TaskView) -> LeapState:
        grad = [torch.zeros_like(p) for p in view.params]
        if not self.loss_term:
            return LeapState(grad)
        probe = view.task.task_batch(0)
        return LeapState(grad, probe, self._probe_loss(view, probe))

    def after_step(self, state: LeapState, view: TaskView, previous: Sequence[torch.Tensor],
                   grads: Sequence[torch.Tensor]) -> LeapState:
        # state.grad is task-local (dropped with the task on failure): updated in place.
        delta = [p.detach() - q for p, q in zip(view.params, previous)]
        sq = torch.stack([d.pow(2).sum() for d in delta]).sum()
        if not self.loss_term:
            norm = sq.sqrt().clamp_min(torch.finfo(sq.dtype).tiny)
            for a, d in zip(state.grad, delta):
                a.sub_(d / norm)
            return state
        loss = self._probe_loss(view, state.probe)
        dloss = loss - state.loss
        norm = (sq + dloss.pow(2)).sqrt().clamp_min(torch.finfo(sq.dtype).tiny)
        for a, d, g in zip(state.grad, delta, grads):
            a.sub_((dloss * g + d) / norm)
        return state._replace(loss=loss)

    def end_task(self, state: LeapState, view: TaskView) -> Optional[Tensors]:
        return state.grad

    def __repr__(self) -> str:
        return f"Leap(loss_term={self.loss_term})"


class Reptile(InitialisationLearner):
    """Reptile (Nichol et al., 2018): move θ0 towards θ_K; the gradient is θ0 − θ_K."""

    def end_task(self, state: Any, view: TaskView) -> Optional[Tensors]:
        return [t0.detach() - p.detach() for t0, p in zip(view.theta0, view.params)]


class FOMAML(InitialisationLearner):
    """First-order MAML: ∇_θ L_meta(θ_K), the query loss gradient at the adapted point."""

    def end_task(self, state: Any, view: TaskView) -> Optional[Tensors]:
        theta = [p.detach().requires_grad_(True) for p in view.params]
        task = view.task
        loss = task.meta_loss(view.context.forward_at(theta, view.buffers), task.meta_batch(view.steps))
        return list(torch.autograd.grad(loss, theta))


class MAML(InitialisationLearner):
    """MAML (Finn et al., 2017; Eq. 1 with P = I), second order through all K task steps.

    The K steps are replayed differentiably from θ0 with the task optimizer's update rule on
    the batches the training loop used (``Task.loop_batch``: for few-shot tasks, the support
    set), so the gradient is that of the trajectory taken; L_meta is taken on a meta batch
    (the query set). Warp parameters are held fixed in this term (Eq. 11 applies C only to θ0).
    """

    def end_task(self, state: Any, view: TaskView) -> Optional[Tensors]:
        ctx, task = view.context, view.task
        batches = [task.loop_batch(k) for k in range(view.steps)]  # fails before any work if unknown
        theta0 = [t.detach().requires_grad_(True) for t in view.theta0]
        theta: Sequence[torch.Tensor] = theta0
        states: list[dict[str, torch.Tensor]] = [{} for _ in theta0]
        buffers = [b.detach() for b in view.start_buffers]
        for batch in batches:
            loss = task.task_loss(ctx.forward_at(theta, buffers), batch)
            grads = torch.autograd.grad(loss, theta, create_graph=True)
            theta, states = ctx.step(theta, grads, states, ctx.hypers)
        loss = task.meta_loss(ctx.forward_at(theta, buffers), task.meta_batch(view.steps))
        return list(torch.autograd.grad(loss, theta0))


class MultiTask(InitialisationLearner):
    """Multi-task objective C_multi(θ0) = E_τ L_task(θ0) (Section 2.5 (a), Algorithm 3)."""

    def end_task(self, state: Any, view: TaskView) -> Optional[Tensors]:
        theta = [t.detach().requires_grad_(True) for t in view.theta0]
        task = view.task
        loss = task.task_loss(view.context.forward_at(theta, view.start_buffers), task.task_batch(0))
        return list(torch.autograd.grad(loss, theta))


def leap(loss_term: bool = True) -> Leap:
    return Leap(loss_term)


def reptile() -> Reptile:
    return Reptile()


def fomaml() -> FOMAML:
    return FOMAML()


def maml() -> MAML:
    return MAML()


def multitask() -> MultiTask:
    return MultiTask()


def none() -> NoInitialisation:
    return NoInitialisation()
