"""Meta-learners of the initialisation θ0: the C(θ0) term of J = L(φ) + λ C(θ0) (Eq. 9).

Each learner turns one adapted task into a gradient contribution for θ0; the meta-optimizer
averages contributions over the tasks of a meta-batch and applies them with learning rate
λβ. Hooks (all optional to override):

- ``begin_task(run)``: the task starts at θ0 (``run.params`` hold θ0).
- ``after_step(run, previous, grads)``: θ_{k-1} = ``previous``, its task gradient ``grads``,
  θ_k = ``run.params`` (live).
- ``end_task(run) -> list[Tensor] | None``: ∇C(θ0) for this task (None: no contribution).

Subclass ``InitialisationLearner`` to plug in your own.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .trajectory import TaskRun

__all__ = ["InitialisationLearner", "Leap", "Reptile", "FOMAML", "MAML", "MultiTask", "NoInitialisation",
           "leap", "reptile", "fomaml", "maml", "multitask", "none"]

Tensors = list[torch.Tensor]


class InitialisationLearner:
    """Base class: a fixed θ0 (no contribution); tasks start from θ0."""

    #: whether ``after_step`` needs θ_{k-1} (costs one parameter copy per step)
    needs_previous: bool = False

    def begin_task(self, run: TaskRun) -> None:
        pass

    def after_step(self, run: TaskRun, previous: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        pass

    def end_task(self, run: TaskRun) -> Optional[Tensors]:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoInitialisation(InitialisationLearner):
    """θ0 is a fixed random initialisation, never meta-learned (λC(θ0) = 0; Appendix G, J)."""


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

    def _probe_loss(self, run: TaskRun) -> torch.Tensor:
        forward = run.context.forward_at([p.detach() for p in run.params], run.buffers)
        with torch.no_grad():
            return run.task.task_loss(forward, run.extras["leap_probe"]).detach()

    def begin_task(self, run: TaskRun) -> None:
        run.extras["leap_grad"] = [torch.zeros_like(p) for p in run.params]
        if self.loss_term:
            run.extras["leap_probe"] = run.task.task_batch(0)
            run.extras["leap_loss"] = self._probe_loss(run)

    def after_step(self, run: TaskRun, previous: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        delta = [p.detach() - q for p, q in zip(run.params, previous)]
        sq = torch.stack([d.pow(2).sum() for d in delta]).sum()
        acc = run.extras["leap_grad"]
        if self.loss_term:
            loss = self._probe_loss(run)
            dloss = loss - run.extras["leap_loss"]
            run.extras["leap_loss"] = loss
            norm = (sq + dloss.pow(2)).sqrt().clamp_min(torch.finfo(sq.dtype).tiny)
            for a, d, g in zip(acc, delta, grads):
                a.sub_((dloss * g + d) / norm)
        else:
            norm = sq.sqrt().clamp_min(torch.finfo(sq.dtype).tiny)
            for a, d in zip(acc, delta):
                a.sub_(d / norm)

    def end_task(self, run: TaskRun) -> Optional[Tensors]:
        return run.extras.pop("leap_grad")


class Reptile(InitialisationLearner):
    """Reptile (Nichol et al., 2018): move θ0 towards θ_K; the gradient is θ0 − θ_K."""

    def end_task(self, run: TaskRun) -> Optional[Tensors]:
        return [t0.detach() - p.detach() for t0, p in zip(run.theta0, run.params)]


class FOMAML(InitialisationLearner):
    """First-order MAML: ∇_θ L_meta(θ_K), the query loss gradient at the adapted point."""

    def end_task(self, run: TaskRun) -> Optional[Tensors]:
        theta = [p.detach().requires_grad_(True) for p in run.params]
        task = run.task
        loss = task.meta_loss(run.context.forward_at(theta, run.buffers), task.meta_batch(run.steps))
        return list(torch.autograd.grad(loss, theta))


class MAML(InitialisationLearner):
    """MAML (Finn et al., 2017; Eq. 1 with P = I), second order through all K task steps.

    The K steps are replayed differentiably from θ0 with the task optimizer's update rule on
    batches from the task's data source (for few-shot tasks: the support set, the data the
    loop itself adapts on) and L_meta is taken on a meta batch (the query set). Warp
    parameters are held fixed in this term (Eq. 11 applies C only to θ0).
    """

    def end_task(self, run: TaskRun) -> Optional[Tensors]:
        ctx, task = run.context, run.task
        theta0 = [t.detach().requires_grad_(True) for t in run.theta0]
        theta: Sequence[torch.Tensor] = theta0
        states: list[dict[str, torch.Tensor]] = [{} for _ in theta0]
        buffers = [b.detach() for b in run.start_buffers]
        for k in range(run.steps):
            loss = task.task_loss(ctx.forward_at(theta, buffers), task.task_batch(k))
            grads = torch.autograd.grad(loss, theta, create_graph=True)
            theta, states = ctx.step(theta, grads, states, ctx.hypers)
        loss = task.meta_loss(ctx.forward_at(theta, buffers), task.meta_batch(run.steps))
        return list(torch.autograd.grad(loss, theta0))


class MultiTask(InitialisationLearner):
    """Multi-task objective C_multi(θ0) = E_τ L_task(θ0) (Section 2.5 (a), Algorithm 3)."""

    def end_task(self, run: TaskRun) -> Optional[Tensors]:
        theta = [t.detach().requires_grad_(True) for t in run.theta0]
        task = run.task
        loss = task.task_loss(run.context.forward_at(theta, run.start_buffers), task.task_batch(0))
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
