"""Vectorised replay: the meta-objectives over a mini-batch of samples at once (``torch.func``).

    opt = warpopt.WarpGradMetaOptimizer(model, algorithm=warpopt.offline(
        batch_size=32, gradient=warpopt.vectorised.vectorised(chunk_size=16)))

The per-sample path (``warpopt.objectives.meta_gradient``) runs a Python loop over the η
replayed points of a mini-batch, one small forward/backward each. Here the points' θ_k,
optimizer states, buffers and batches are stacked along a new leading dimension and the
SAME per-sample objective (``warpopt.exact``, ``warpopt.approx`` or your own, defined once in
terms of ``context.gradient``, here ``torch.func.grad``) is mapped over them with
``torch.func.vmap``; this module only batches:

    per_sample(θ_k, s_k, b_k, task batch, meta batch) = objective(context, sample_k)

and the mean over the mini-batch is differentiated with respect to the meta parameters φ
(and learned hyper-parameters), which the model holds as ordinary captured tensors. The
result is the same meta-gradient as the loop (tested to float64 tolerance). ``chunk_size``
bounds memory: that many samples are mapped and differentiated at a time (one autograd graph
alive per chunk, gradients accumulated), so peak memory grows with ``chunk_size``, not η.

Policies:

- **Batches**: each sample's task and meta batches are drawn in Python, in the loop's order
  (task batch then meta batch, sample after sample), so stateful data sources see the same
  sequence of draws. Samples are stacked in groups that share the batch structure (shapes and
  dtypes), the optimizer-state keys and the loss functions; each group is one vmap call and
  the group results are summed with weight ``len(group)/η``. Samples whose steps used
  different hyper-parameters (a scheduler changing the lr) or clipping, or whose tasks ran in
  different train/eval modes, form different groups.
  Equal batch shapes across a mini-batch (the normal case) give a single group; with
  ``strict=True`` anything else raises a ``ValueError`` naming the mismatch instead.
- **BatchNorm**: every sample gets its own *batched clone* of the recorded buffers, and each
  forward clones again (as ``ReplayContext.forward_at`` does), so train-mode running-stat
  updates are in-place writes into per-sample copies: legal under vmap and never visible in
  the recorded points or the live model. In train mode BatchNorm normalises with each
  sample's own batch statistics, exactly as the loop does.
- **Custom objectives** are vectorised like the built-in ones when they depend on a sample
  through its tensors, its batches and its task's loss functions (a group shares its first
  sample's task). One that vmap cannot map (``.item()``, data-dependent control flow) falls
  back to the per-sample loop with a warning (``fallback=True``, default) or raises
  ``TypeError`` with vmap's reason (``fallback=False``).
  Models with ``nn.RNN``/``LSTM``/``GRU`` modules are not vectorised (torch has no vmap
  batching rule for their fused ops): the per-sample loop, or ``TypeError`` with
  ``fallback=False``.
- **Randomness** (dropout) inside the objective: ``randomness="different"`` by default
  (independent draws per sample, as the loop); it cannot reproduce the loop's exact draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vmap
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .kernels import unvectorisable
from .objectives import (
    Objective,
    ReplayContext,
    accumulate_gradient,
    functional_gradient,
    meta_gradient,
    trainable,
    with_batches,
)
from .trajectory import Sample

__all__ = ["vectorised", "vectorised_meta_gradient"]

GradientFn = Callable[..., tuple[list[torch.Tensor], torch.Tensor]]


def _loss_key(fn: Callable) -> Any:
    # Task(data, loss_fn) wraps each criterion in a fresh closure; two tasks with the same
    # criterion compute the same function, so they may share one vmap call.
    return getattr(fn, "criterion", fn)


def _batch_signature(batch: Any) -> Any:
    leaves, spec = pytree.tree_flatten(batch)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"vectorised replay needs batches made of tensors, got a leaf of type "
                f"{type(leaf).__name__}; use the per-sample gradient (the default) instead"
            )
    return spec, tuple((tuple(t.shape), t.dtype, t.device) for t in leaves)


def _stack(trees: Sequence[Any]) -> Any:
    """Stack a list of identically structured pytrees of tensors along a new dim 0."""
    flat = [pytree.tree_flatten(t) for t in trees]
    spec = flat[0][1]
    columns = zip(*(leaves for leaves, _ in flat))
    return pytree.tree_unflatten([torch.stack(list(col)) for col in columns], spec)


def _group_key(sample: Sample, task_batch: Any, meta_batch: Any) -> Any:
    task = sample.task
    return (
        _loss_key(task.batch_loss),
        _loss_key(task.meta_batch_loss),
        tuple(tuple(s.keys()) for s in sample.states),
        _batch_signature(task_batch),
        _batch_signature(meta_batch),
        sample.hypers,
        getattr(task, "training", None),  # the train/eval modes its loop ran in (objectives.in_modes)
    )  # recorded per-step lr/clipping are Python numbers: one vmap call per value


def _describe(key: Any) -> str:
    loss, meta_loss, states, (_, task_shapes), (_, meta_shapes), hypers, _ = key
    return (
        f"task batch {[s for s, *_ in task_shapes]}, meta batch {[s for s, *_ in meta_shapes]}, "
        f"step hyper-parameters {hypers}, "
        f"state keys {states}, losses ({getattr(loss, '__name__', loss)}, "
        f"{getattr(meta_loss, '__name__', meta_loss)})"
    )


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``F.batch_norm`` from elementary ops (same values, same running-stat updates).

    torch 2.13's vmap batching rule of the fused batch-norm kernel gives wrong second-order
    gradients when the affine weight is batched (a per-sample θ): the exact objective's
    meta-gradient through a BatchNorm followed by further warped layers differed from the
    loop's. Elementary ops differentiate correctly under vmap, so replay uses this.
    """
    dims = [0, *list(range(2, input.dim()))]
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None:
        mean = input.mean(dims)
        var = input.var(dims, unbiased=False)
        if training and running_mean is not None:
            n = input.numel() // input.size(1)
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(n - 1, 1))
    else:
        mean, var = running_mean, running_var
    out = (input - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` from elementary ops.

    The fused kernel's vmap rule has the same fault as batch norm's: with a batched affine
    weight and an input that depends on φ (a LayerNorm after a warp, as in every transformer
    block), the exact objective's meta-gradient differed from the loop's by ~1e-4 relative."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, unbiased=False, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


class _DecomposedNorms(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _per_sample_fn(objective: Objective, context: ReplayContext, first: Sample) -> Callable:
    """``objective`` of one sample as a pure function of its (unbatched) tensors and batches.

    The objective itself is the one definition in ``warpopt.objectives``: this only swaps the
    sample's tensors for vmap's per-sample slices. Samples of a group share the first one's
    task (hence its loss functions, by which the group was formed).
    """

    context = replace(context, gradient=functional_gradient)  # autograd cannot run under vmap

    def fn(params, states, buffers, task_batch, meta_batch):
        sample = replace(
            first,
            params=list(params),
            states=list(states),
            buffers=list(buffers),
            task_batch=task_batch,
            meta_batch=meta_batch,
        )
        with _DecomposedNorms():
            return objective(context, sample)

    return fn


def vectorised_meta_gradient(
    objective: Objective,
    context: ReplayContext,
    samples: Sequence[Sample],
    meta_params: Sequence[torch.Tensor],
    *,
    chunk_size: int | None = None,
    fallback: bool = True,
    strict: bool = False,
    randomness: str = "different",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Drop-in replacement for ``warpopt.objectives.meta_gradient`` (see the module docstring)."""
    reason = unvectorisable(context.model)  # recurrent layers (warpopt/kernels.py)
    if reason is not None:
        if fallback:
            return meta_gradient(objective, context, samples, meta_params)
        raise TypeError(
            f"vectorised replay cannot map this model: {reason}; pass fallback=True to use the per-sample loop"
        )
    n = len(samples)
    if n == 0:
        raise ValueError("vectorised replay got an empty mini-batch")
    drawn = [with_batches(sample) for sample in samples]  # the loop's draw order
    groups: dict[Any, list[Sample]] = {}
    for sample in drawn:
        groups.setdefault(_group_key(sample, sample.task_batch, sample.meta_batch), []).append(sample)
    if strict and len(groups) > 1:
        keys = list(groups)
        raise ValueError(
            "vectorised replay (strict=True) needs equal batch shapes, optimizer-state keys, "
            f"losses and step hyper-parameters (lr, clipping) across the mini-batch; got {len(keys)} "
            f"kinds, e.g. {_describe(keys[0])} vs "
            f"{_describe(keys[1])}"
        )

    meta_params = list(meta_params)
    grads = [torch.zeros_like(p) for p in meta_params]
    total = torch.zeros((), device=grads[0].device if grads else None)
    with trainable(meta_params):
        for members in groups.values():
            fn = vmap(_per_sample_fn(objective, context, members[0]), randomness=randomness)
            step = chunk_size or len(members)
            for start in range(0, len(members), step):  # one graph per chunk: memory ∝ chunk_size
                try:
                    loss = fn(*_stacked(members[start : start + step])).sum() / n
                except Exception as error:  # an objective vmap cannot map: say why, or loop
                    if not fallback:
                        raise TypeError(
                            f"cannot vectorise the objective {getattr(objective, '__name__', objective)!r}"
                            f" with torch.func.vmap: {type(error).__name__}: {error}. Use the "
                            "per-sample gradient or pass fallback=True"
                        ) from error
                    warnings.warn(
                        f"vectorised replay fell back to the per-sample loop: vmap failed on "
                        f"{getattr(objective, '__name__', objective)!r} ({type(error).__name__}: {error})",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return meta_gradient(objective, context, drawn, meta_params)  # the batches drawn above
                accumulate_gradient(loss, meta_params, grads)
                total = total + loss.detach()
    return grads, total


def _stacked(members: Sequence[Sample]) -> tuple[Any, ...]:
    """The per-sample tensors and batches of a group, stacked along a new leading dimension."""
    first = members[0]
    params = tuple(torch.stack([p.detach() for p in column]) for column in zip(*(m.params for m in members)))
    buffers = tuple(torch.stack([b.detach() for b in column]) for column in zip(*(m.buffers for m in members)))
    states = tuple(
        {key: torch.stack([m.states[i][key].detach() for m in members]) for key in first.states[i]}
        for i in range(len(first.states))
    )
    return params, states, buffers, _stack([m.task_batch for m in members]), _stack([m.meta_batch for m in members])


def vectorised(
    chunk_size: int | None = None, *, fallback: bool = True, strict: bool = False, randomness: str = "different"
) -> GradientFn:
    """A ``gradient=`` function for ``warpopt.offline`` that replays a mini-batch with vmap.

    Args:
        chunk_size: samples evaluated per vmap chunk (None: the whole mini-batch at once);
            lower it to bound memory (peak memory grows linearly with it).
        fallback: an objective that vmap cannot map falls back to the per-sample loop with a
            warning (else ``TypeError`` saying why).
        strict: raise ``ValueError`` if the mini-batch's batches differ in shape (else such
            samples are grouped and each group is vectorised separately).
        randomness: ``torch.func.vmap``'s randomness mode for random ops in the model.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of samples or None, got {chunk_size}")

    def gradient(
        objective: Any, context: ReplayContext, samples: Sequence[Sample], meta_params: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        return vectorised_meta_gradient(
            objective,
            context,
            samples,
            meta_params,
            chunk_size=chunk_size,
            fallback=fallback,
            strict=strict,
            randomness=randomness,
        )

    gradient.chunk_size = chunk_size  # type: ignore[attr-defined]
    return gradient
