"""The WarpGrad meta-objectives over replayed task parameters (Section 2.4).

Exact (Eq. 7):        L(φ) = Σ_τ Σ_{θ_k} L_meta( U(θ_k, ∇L_task(θ_k; φ)) ; φ )
Approximate (Eq. 8):  L̂(φ) = Σ_τ Σ_{θ_k} L_meta( sg[U(θ_k, ∇L_task(θ_k; φ))] ; φ )

U is one step of the user's task optimizer, replayed from the optimizer state recorded at θ_k
(for plain SGD, U(θ, g) = θ − α g). The exact objective differentiates through U and hence
through ∇L_task (a Hessian-vector product: second order); the approximate one takes the
updated parameters as given and keeps only the direct dependence of L_meta on φ. L_task and
L_meta are evaluated on two different fresh batches of the task's data (Appendix E).

An objective is ONE per-sample function ``(context, sample) -> scalar tensor``. It is pure in
the sample's tensors and batches (``sample.task_batch``/``sample.meta_batch``, drawn by
``with_batches`` before the call) and takes inner gradients through ``context.gradient``, so the
same definition serves the per-sample loop here (``torch.autograd``, which runs whatever the
task loop ran: packed sequences, ``autograd.Function``s without ``setup_context``, activation
checkpointing, none of which ``torch.func.grad`` accepts) and ``torch.func.vmap`` in
``warpopt.vectorised`` (which stacks samples and swaps in ``torch.func.grad``). Adding an
objective is one function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad

from .clipping import clip_gradients
from .kernels import replay_kernels
from .step_hypers import StepHypers, hypers_at
from .trajectory import Sample

__all__ = ["ReplayContext", "Objective", "exact", "approx", "meta_gradient", "with_batches", "trainable"]


Gradient = Callable[[Callable[[list[torch.Tensor]], torch.Tensor], Sequence[torch.Tensor]], list[torch.Tensor]]


def autograd_gradient(
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor], theta: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """∇θ ``loss_fn(θ)`` by ``torch.autograd``, differentiable (``create_graph``) when grad mode is
    on; θ that do not require grad are differentiated as fresh leaves, θ that do (MAML's
    trajectory) keep their graph. Parameters the loss does not reach get zeros, as with
    ``torch.func.grad``."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        wrt = [t if t.requires_grad else t.detach().requires_grad_(True) for t in theta]
        loss = loss_fn(wrt)
        grads = (
            torch.autograd.grad(loss, wrt, create_graph=create_graph, allow_unused=True)
            if loss.requires_grad
            else [None] * len(wrt)
        )
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wrt)]


def functional_gradient(
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor], theta: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """∇θ ``loss_fn(θ)`` by ``torch.func.grad``: valid under ``torch.func.vmap``."""
    return list(grad(loss_fn)(list(theta)))


def module_modes(model: nn.Module) -> tuple[bool, ...]:
    """The train/eval flag of every module of ``model`` (``Task.training`` records the loop's)."""
    return tuple(m.training for m in model.modules())


@contextlib.contextmanager
def in_modes(model: nn.Module, modes: Sequence[bool] | None) -> Iterator[None]:
    """``model``'s modules in the train/eval ``modes`` (None or a different module tree: as they
    are), put back on exit: a replayed step runs BatchNorm and dropout as the loop's step did."""
    modules = list(model.modules())
    now = [m.training for m in modules]
    if modes is None or len(modes) != len(modules) or tuple(now) == tuple(modes):
        yield
        return
    for m, flag in zip(modules, modes):
        m.training = flag
    try:
        yield
    finally:
        for m, flag in zip(modules, now):
            m.training = flag


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
        groups: per adapt parameter, the index of its param group (to apply a sample's
            recorded per-step hyper-parameters, ``Sample.hypers``).
        learned: the learned hyper-parameters (tensors), which override recorded values.
        gradient: how inner gradients ∇θ L_task are taken: ``autograd_gradient`` (default) or
            ``functional_gradient`` (under ``torch.func.vmap``: ``warpopt.vectorised``).
    """

    model: nn.Module
    param_names: Sequence[str]
    buffer_names: Sequence[str]
    step: Callable[..., tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]
    hypers: Sequence[Mapping[str, Any]]
    groups: Sequence[int] = ()
    learned: Mapping[str, Any] = field(default_factory=dict)
    gradient: Gradient = autograd_gradient

    def forward_at(
        self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], modes: Sequence[bool] | None = None
    ) -> Callable[..., Any]:
        """``forward(*inputs)`` of the model at θ = ``params`` (φ live); a pure function. ``modes``:
        the modules' train/eval flags to run in (``Task.training``, the loop's; None: as they are).

        Buffers are cloned: a BatchNorm in train mode updates its running statistics in
        place, and those must not leak into the recorded point or the live model. That holds
        for the warp layers' own buffers (a warp with BatchNorm) too, which the live model
        keeps: a replay reads them and never writes them (writing a captured tensor inside
        ``torch.func.grad`` is an error anyway).
        """
        mapping = dict(zip(self.param_names, params))
        mapping.update(zip(self.buffer_names, (b.clone() for b in buffers)))
        model = self.model
        for name, b in model.named_buffers():
            if name not in mapping:
                mapping[name] = b.clone()

        def forward(*args: Any, **kwargs: Any) -> Any:
            with replay_kernels(model), in_modes(model, modes):  # twice-differentiable kernels (kernels.py)
                return functional_call(model, mapping, args, kwargs, strict=False)

        return forward

    def task_loss_at(self, sample: Sample, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """L_task(θ; φ) on the sample's task batch, in the modes the task's loop ran in."""
        modes = getattr(sample.task, "training", None)
        return sample.task.task_loss(self.forward_at(params, sample.buffers, modes), sample.task_batch)

    def meta_loss_at(self, sample: Sample, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """L_meta(θ; φ) on the sample's meta batch, in the modes the task's loop ran in."""
        modes = getattr(sample.task, "training", None)
        return sample.task.meta_loss(self.forward_at(params, sample.buffers, modes), sample.meta_batch)

    def task_gradient(
        self, sample: Sample, params: Sequence[torch.Tensor], create_graph: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """L_task(θ_k; φ) on the sample's task batch (drawn if absent) and its θ-gradient."""
        sample = with_batches(sample)
        loss = self.task_loss_at(sample, params)
        return loss, torch.autograd.grad(loss, params, create_graph=create_graph)

    def hypers_at(self, recorded: StepHypers | None) -> Sequence[Mapping[str, Any]]:
        """Per adapt parameter, the hyper-parameters of a step that recorded ``recorded``
        (None: the param groups as they are now)."""
        if recorded is None:
            return self.hypers
        return hypers_at(self.hypers, self.groups, recorded, self.learned)

    def apply_step(
        self,
        theta: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        states: Sequence[Any],
        recorded: StepHypers | None,
    ) -> tuple[list[torch.Tensor], list[Any]]:
        """U as the recorded step took it: clip the gradients as it did (``warpopt.clipping``,
        differentiable), then the task optimizer's update with that step's hyper-parameters."""
        if recorded is not None and recorded.clip is not None:
            grads = clip_gradients(grads, *recorded.clip)
        return self.step(list(theta), list(grads), states, self.hypers_at(recorded))

    def update(self, sample: Sample, theta: list[torch.Tensor]) -> list[torch.Tensor]:
        """U(θ_k, ∇L_task(θ_k; φ)): one replayed task-optimizer step, differentiable in θ, φ
        and tensor hyper-parameters (``self.gradient``), with the hyper-parameters and clipping
        of the step taken from θ_k (``sample.hypers``)."""
        grads = self.gradient(lambda t: self.task_loss_at(sample, t), theta)
        updated, _ = self.apply_step(theta, grads, sample.states, sample.hypers)
        return updated


Objective = Callable[[ReplayContext, Sample], torch.Tensor]


def with_batches(sample: Sample) -> Sample:
    """The sample with its task and meta batches drawn (task first, then meta: the draw order
    every replay path keeps, so stateful data sources see the same sequence)."""
    if sample.task_batch is not None and sample.meta_batch is not None:
        return sample
    task_batch = sample.task.task_batch(sample.step) if sample.task_batch is None else sample.task_batch
    meta_batch = sample.task.meta_batch(sample.step) if sample.meta_batch is None else sample.meta_batch
    return replace(sample, task_batch=task_batch, meta_batch=meta_batch)


def exact(context: ReplayContext, sample: Sample) -> torch.Tensor:
    """Eq. 7: L_meta after one *differentiable* task-optimizer step from θ_k."""
    sample = with_batches(sample)
    return context.meta_loss_at(sample, context.update(sample, list(sample.params)))


def approx(context: ReplayContext, sample: Sample) -> torch.Tensor:
    """Eq. 8: L_meta after a stop-gradient task-optimizer step from θ_k (first order)."""
    sample = with_batches(sample)
    with torch.no_grad():  # sg[U(θ_k, ∇L_task)]: context.gradient still takes ∇L_task under no_grad
        updated = context.update(sample, list(sample.params))
    return context.meta_loss_at(sample, [u.detach() for u in updated])


@contextlib.contextmanager
def trainable(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily let ``params`` require gradients (φ is frozen while tasks adapt)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def accumulate_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor], into: Sequence[torch.Tensor]) -> None:
    """``into += ∂loss/∂params``; parameters the loss does not reach are left as they are."""
    if not loss.requires_grad:
        return
    for g, part in zip(into, torch.autograd.grad(loss, params, allow_unused=True)):
        if part is not None:
            g.add_(part)


def meta_gradient(
    objective: Objective, context: ReplayContext, samples: Sequence[Sample], meta_params: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """∇ of the mean objective over ``samples`` w.r.t. ``meta_params``, and the mean loss.

    Samples are differentiated one at a time so only one replay graph is alive at once.
    Parameters the objective does not reach get a zero gradient. Note the *mean*: Algorithm 2
    sums over a mini-batch; with η fixed the two differ by the constant η (absorbed in β).
    """
    grads = [torch.zeros_like(p) for p in meta_params]
    total = torch.zeros((), device=grads[0].device if grads else None)
    n = len(samples)
    with trainable(meta_params):
        for sample in samples:
            loss = objective(context, with_batches(sample)) / n
            accumulate_gradient(loss, meta_params, grads)
            total = total + loss.detach()
    return grads, total
