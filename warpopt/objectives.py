"""The WarpGrad meta-objectives over replayed task parameters (Section 2.4).

Exact (Eq. 7):        L(φ) = Σ_τ Σ_{θ_k} L_meta( U(θ_k, ∇L_task(θ_k; φ)) ; φ )
Approximate (Eq. 8):  L̂(φ) = Σ_τ Σ_{θ_k} L_meta( sg[U(θ_k, ∇L_task(θ_k; φ))] ; φ )

U is one step of the user's task optimizer, replayed from the optimizer state recorded at θ_k
(for plain SGD, U(θ, g) = θ − α g). The exact objective differentiates through U and hence
through ∇L_task (a Hessian-vector product: second order); the approximate one takes the
updated parameters as given and keeps only the direct dependence of L_meta on φ. L_task and
L_meta are evaluated on two different fresh batches of the task's data (Appendix E).

An objective is a callable ``(context, sample) -> scalar tensor``; anything with that
signature can be passed to ``WarpGradMetaOptimizer(objective=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .kernels import replay_kernels
from .trajectory import Sample

__all__ = ["ReplayContext", "Objective", "exact", "approx", "meta_gradient"]


@dataclass
class ReplayContext:
    """What replaying a sample needs besides the sample itself.

    Attributes:
        model: the warped model; its warp parameters φ are the live ones.
        param_names: qualified names of the adapt parameters θ, in sample order.
        buffer_names: qualified names of the adapt buffers, in sample order.
        step: the task optimizer's differentiable update U (``warpopt.task_optimizers``).
        hypers: per adapt parameter, its param-group hyper-parameters (learned lr/momentum
            appear as tensors so the exact objective differentiates through them).
    """

    model: nn.Module
    param_names: Sequence[str]
    buffer_names: Sequence[str]
    step: Callable[..., tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]
    hypers: Sequence[Mapping[str, Any]]

    def forward_at(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> Callable[..., Any]:
        """``forward(*inputs)`` of the model at θ = ``params`` (φ live).

        Buffers are cloned: a BatchNorm in train mode updates its running statistics in
        place, and those must not leak into the recorded point or the live model.
        """
        mapping = dict(zip(self.param_names, params))
        mapping.update(zip(self.buffer_names, (b.clone() for b in buffers)))
        model = self.model

        def forward(*args: Any, **kwargs: Any) -> Any:
            with replay_kernels(model):  # twice-differentiable kernels (warpopt/kernels.py)
                return functional_call(model, mapping, args, kwargs, strict=False)

        return forward

    def task_gradient(self, sample: Sample, params: Sequence[torch.Tensor], create_graph: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """L_task(θ_k; φ) on a fresh batch and its gradient with respect to θ."""
        loss = sample.task.task_loss(self.forward_at(params, sample.buffers), sample.task.task_batch(sample.step))
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        return loss, grads

    def meta_loss_at(self, sample: Sample, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """L_meta(θ; φ) on a fresh meta batch."""
        return sample.task.meta_loss(self.forward_at(params, sample.buffers), sample.task.meta_batch(sample.step))


Objective = Callable[[ReplayContext, Sample], torch.Tensor]


def _leaves(sample: Sample) -> list[torch.Tensor]:
    return [p.detach().requires_grad_(True) for p in sample.params]


def exact(context: ReplayContext, sample: Sample) -> torch.Tensor:
    """Eq. 7: L_meta after one *differentiable* task-optimizer step from θ_k."""
    theta = _leaves(sample)
    _, grads = context.task_gradient(sample, theta, create_graph=True)
    updated, _ = context.step(theta, grads, sample.states, context.hypers)
    return context.meta_loss_at(sample, updated)


def approx(context: ReplayContext, sample: Sample) -> torch.Tensor:
    """Eq. 8: L_meta after a stop-gradient task-optimizer step from θ_k (first order)."""
    theta = _leaves(sample)
    _, grads = context.task_gradient(sample, theta, create_graph=False)
    with torch.no_grad():
        updated, _ = context.step(theta, grads, sample.states, context.hypers)
    return context.meta_loss_at(sample, [u.detach() for u in updated])


def accumulate_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor], into: Sequence[torch.Tensor]) -> None:
    """``into += ∂loss/∂params``; parameters the loss does not reach are left as they are."""
    for g, part in zip(into, torch.autograd.grad(loss, params, allow_unused=True)):
        if part is not None:
            g.add_(part)


def meta_gradient(objective: Objective, context: ReplayContext, samples: Sequence[Sample],
                  meta_params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """∇ of the mean objective over ``samples`` w.r.t. ``meta_params``, and the mean loss.

    Samples are differentiated one at a time so only one replay graph is alive at once.
    Parameters the objective does not reach get a zero gradient.
    """
    grads = [torch.zeros_like(p) for p in meta_params]
    total = torch.zeros((), device=grads[0].device if grads else None)
    n = len(samples)
    for sample in samples:
        loss = objective(context, sample) / n
        accumulate_gradient(loss, meta_params, grads)
        total = total + loss.detach()
    return grads, total
