"""Differentiable, functional re-implementations of ``torch.optim`` update rules.

WarpGrad's exact meta-objective (Eq. 7 of Flennerhag et al., ICLR 2020) evaluates
the task loss after *one* step of the task optimizer taken from a replayed point
``θ_k``, with the optimizer state that was recorded at that point.  The functions
here take that step out of place so that autograd can flow through it (with
``create_graph=True``) into the parameters, the gradients (hence the warp layers)
and tensor-valued hyper-parameters such as a learned learning rate.

Every functional step follows the :class:`FunctionalStep` protocol::

    new_params, new_states = step(params, grads, states, hypers)

* ``params[i]``, ``grads[i]``: tensors of identical shape ``S_i``; never mutated.
* ``states[i]``: the per-parameter state ``torch.optim`` holds *before* the step
  (same keys as ``optimizer.state[p]``); an empty mapping means a fresh state.
* ``hypers[i]``: the param-group dict of parameter ``i``.  ``lr``, ``momentum``,
  ``betas``, ``alpha`` and ``weight_decay`` may be Python floats or 0-dim tensors.
* Returns new parameter tensors (shape ``S_i``) and new state dicts, where every
  moment tensor has shape ``S_i`` and ``step`` (if any) is a 0-dim float tensor.

Notation: α learning rate, μ momentum, τ dampening, λ weight decay, g gradient.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "State",
    "FunctionalStep",
    "sgd_step",
    "adam_step",
    "adamw_step",
    "rmsprop_step",
    "register_functional_step",
    "functional_step_for",
    "supported_optimizers",
    "state_keys_for",
    "optimizer_states",
    "load_optimizer_states",
]

State = dict[str, Tensor]


class FunctionalStep(Protocol):
    """One out-of-place, differentiable optimizer step (see module docstring)."""

    state_keys: tuple[str, ...]

    def __call__(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        states: Sequence[Mapping[str, Tensor]],
        hypers: Sequence[Mapping[str, Any]],
    ) -> tuple[list[Tensor], list[State]]: ...


# --------------------------------------------------------------------------- helpers


def _is_zero(x: Any) -> bool:
    """``x == 0`` for a float or a (possibly grad-requiring) tensor; no graph is built."""
    if isinstance(x, Tensor):
        return bool((x.detach() == 0).all())
    return x == 0


def _step_dtype(ref: Tensor) -> torch.dtype:
    """Dtype used for the flat ``step`` counter: the param's real dtype, at least float32."""
    real = ref.real.dtype if ref.is_complex() else ref.dtype
    return torch.promote_types(real, torch.float32)


def _apply(one, params, grads, states, hypers) -> tuple[list[Tensor], list[State]]:
    """Validate the four sequences and map the per-parameter update ``one(p, g, state, hyper)``."""
    params, grads, states = list(params), list(grads), list(states)
    hypers = [hypers] * len(params) if isinstance(hypers, Mapping) else list(hypers)
    if not (len(grads) == len(states) == len(hypers) == len(params)):
        raise ValueError(
            "params, grads, states and hypers must have equal lengths, got "
            f"{len(params)}, {len(grads)}, {len(states)}, {len(hypers)}"
        )
    new_params: list[Tensor] = []
    new_states: list[State] = []
    for i, (p, g, st, h) in enumerate(zip(params, grads, states, hypers)):
        if g.is_sparse or p.shape != g.shape:
            raise ValueError(f"param {i}: grad must be dense with the param's shape {tuple(p.shape)}")
        new_p, new_st = one(p, -g if h.get("maximize", False) else g, st, h)
        new_params.append(new_p)
        new_states.append(new_st)
    return new_params, new_states


def _next_step(state: Mapping[str, Tensor], ref: Tensor) -> Tensor:
    """New step counter ``t + 1`` (0-dim float; the old one's dtype/device if present)."""
    old = state.get("step")
    if old is None:
        return torch.ones((), dtype=_step_dtype(ref), device=ref.device)
    old = torch.as_tensor(old).detach()
    return (old if old.is_floating_point() else old.to(_step_dtype(ref))) + 1


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose gradient at ``x = 0`` is 0 instead of ``inf`` (avoids 0·inf = NaN
    in meta-gradients when a gradient entry is exactly zero); forward values are unchanged."""
    nz = x != 0
    return torch.where(nz, torch.where(nz, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _real(x: Tensor) -> Tensor:
    return torch.view_as_real(x) if x.is_complex() else x


def _like(x: Tensor, ref: Tensor) -> Tensor:
    """Undo :func:`_real` for a result computed on real views."""
    return torch.view_as_complex(x.contiguous()) if ref.is_complex() else x


def _buf(state: Mapping[str, Tensor], key: str, ref: Tensor) -> Tensor:
    v = state.get(key)
    return torch.zeros_like(ref) if v is None else v


def _functional_step(state_keys: tuple[str, ...], keys_for: Callable[[Mapping[str, Any]], tuple[str, ...]]):
    """Attach ``state_keys`` (all keys ever used) and ``keys_for(hyper)`` to a step function."""

    def deco(fn):
        fn.state_keys, fn.keys_for = state_keys, keys_for
        return fn

    return deco


def state_keys_for(step: FunctionalStep, hyper: Mapping[str, Any]) -> tuple[str, ...]:
    """State keys ``step`` reads/writes for a param group ``hyper`` (e.g. no buffer when μ = 0)."""
    keys_for = getattr(step, "keys_for", None)
    return tuple(keys_for(hyper)) if keys_for is not None else tuple(step.state_keys)


# --------------------------------------------------------------------------- SGD


def _sgd_keys(h: Mapping[str, Any]) -> tuple[str, ...]:
    return () if _is_zero(h.get("momentum", 0.0)) else ("momentum_buffer",)


@_functional_step(("momentum_buffer",), _sgd_keys)
def sgd_step(params, grads, states, hypers):
    r"""SGD step matching :class:`torch.optim.SGD` (single-tensor path).

    .. math::
        g &\leftarrow \pm g + λ θ \qquad (\text{minus iff } maximize) \\
        v &\leftarrow μ v + (1-τ) g \quad (v \leftarrow g \text{ on the first step, τ ignored}) \\
        d &\leftarrow g + μ v \ (\text{nesterov}) \quad\text{else}\quad d \leftarrow v \\
        θ &\leftarrow θ - α d

    With μ = 0 there is no buffer and ``d = g``.  State: ``momentum_buffer`` of shape
    ``S_i`` (absent when μ = 0).  Unlike torch, the first buffer ``v = g`` keeps its
    autograd graph, so meta-gradients flow through it.
    """
    return _apply(_sgd_one, params, grads, states, hypers)


def _axpy(x: Tensor, a: Any, y: Tensor) -> Tensor:
    """x + a·y: one op (``add`` with ``alpha``, as torch.optim takes it: the same rounding, and one
    graph node instead of two) when ``a`` is a number; a product otherwise (a tensor ``a``, e.g. a
    learned hyper-parameter, is differentiated)."""
    if isinstance(a, (int, float)):
        return torch.add(x, y, alpha=a)
    return x + a * y


def _sgd_one(p, g, st, h):
    lr, mu, wd = h["lr"], h.get("momentum", 0.0), h.get("weight_decay", 0.0)
    if not _is_zero(wd):
        g = _axpy(g, wd, p)
    new_st: State = {}
    if not _is_zero(mu):
        buf = st.get("momentum_buffer")
        buf = g if buf is None else _axpy(mu * buf, 1 - h.get("dampening", 0.0), g)
        new_st["momentum_buffer"] = buf
        g = _axpy(g, mu, buf) if h.get("nesterov", False) else buf
    return _axpy(p, -lr, g), new_st


# --------------------------------------------------------------------------- Adam / AdamW


def _adam_keys(h: Mapping[str, Any]) -> tuple[str, ...]:
    base = ("step", "exp_avg", "exp_avg_sq")
    return (*base, "max_exp_avg_sq") if h.get("amsgrad", False) else base


def _adam_one(p, g, st, h, decoupled: bool):
    lr, (b1, b2), eps = h["lr"], h.get("betas", (0.9, 0.999)), h.get("eps", 1e-8)
    wd = h.get("weight_decay", 0.0)
    step = _next_step(st, p)
    t = step.to(device=p.device, dtype=_step_dtype(p))  # β^t in ≥ the param's precision
    theta = p
    if not _is_zero(wd):
        if decoupled:
            theta = p * (1 - lr * wd)
        else:
            g = g + wd * p
    g_r = _real(g)
    m = b1 * _real(_buf(st, "exp_avg", p)) + (1 - b1) * g_r
    v = b2 * _real(_buf(st, "exp_avg_sq", p)) + (1 - b2) * g_r * g_r
    new_st: State = {"step": step, "exp_avg": _like(m, p), "exp_avg_sq": _like(v, p)}
    v_hat = v
    if h.get("amsgrad", False):
        v_hat = torch.maximum(_real(_buf(st, "max_exp_avg_sq", p)), v)
        new_st["max_exp_avg_sq"] = _like(v_hat, p)
    denom = _safe_sqrt(v_hat) / (1 - b2**t).sqrt() + eps
    return _like(_real(theta) - (lr / (1 - b1**t)) * m / denom, p), new_st


@_functional_step(("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), _adam_keys)
def adam_step(params, grads, states, hypers):
    r"""Adam step matching :class:`torch.optim.Adam` (L2 weight decay, optional AMSGrad).

    .. math::
        t &\leftarrow t + 1, \qquad g \leftarrow \pm g + λ θ \\
        m &\leftarrow β_1 m + (1-β_1) g, \qquad v \leftarrow β_2 v + (1-β_2) g^2 \\
        \hat v &\leftarrow \max(\hat v, v) \ (\text{amsgrad}) \quad\text{else}\quad \hat v \leftarrow v \\
        θ &\leftarrow θ - \frac{α}{1-β_1^t} \, \frac{m}{\sqrt{\hat v}/\sqrt{1-β_2^t} + ε}

    A fresh state means ``t = 0`` and ``m = v = \hat v = 0``.  If the group has
    ``decoupled_weight_decay=True`` (torch ≥ 2.6), AdamW's rule is used instead.
    State: ``step`` (0-dim float), ``exp_avg``, ``exp_avg_sq`` [, ``max_exp_avg_sq``]
    of shape ``S_i``.  Complex params use real views, as torch does.
    """

    def one(p, g, st, h):
        return _adam_one(p, g, st, h, bool(h.get("decoupled_weight_decay", False)))

    return _apply(one, params, grads, states, hypers)


@_functional_step(("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), _adam_keys)
def adamw_step(params, grads, states, hypers):
    r"""AdamW step matching :class:`torch.optim.AdamW` (decoupled weight decay).

    Identical to :func:`adam_step` except that λ does not enter ``g``; instead
    ``θ ← θ (1 - α λ)`` before the Adam update
    ``θ ← θ - α/(1-β_1^t) · m / (\sqrt{\hat v}/\sqrt{1-β_2^t} + ε)``.
    """
    return _apply(lambda p, g, st, h: _adam_one(p, g, st, h, True), params, grads, states, hypers)


# --------------------------------------------------------------------------- RMSprop


def _rmsprop_keys(h: Mapping[str, Any]) -> tuple[str, ...]:
    keys: tuple[str, ...] = ("step", "square_avg")
    if not _is_zero(h.get("momentum", 0.0)):
        keys += ("momentum_buffer",)
    if h.get("centered", False):
        keys += ("grad_avg",)
    return keys


@_functional_step(("step", "square_avg", "momentum_buffer", "grad_avg"), _rmsprop_keys)
def rmsprop_step(params, grads, states, hypers):
    r"""RMSprop step matching :class:`torch.optim.RMSprop`.

    .. math::
        g &\leftarrow \pm g + λ θ, \qquad s \leftarrow a s + (1-a) g^2 \\
        \bar g &\leftarrow a \bar g + (1-a) g, \quad
            d \leftarrow \sqrt{s - \bar g^2} + ε \ (\text{centered}) \quad\text{else}\quad
            d \leftarrow \sqrt{s} + ε \\
        b &\leftarrow μ b + g / d, \ θ \leftarrow θ - α b \ (μ > 0)
            \quad\text{else}\quad θ \leftarrow θ - α g / d

    ``a`` is the ``alpha`` smoothing constant.  State: ``step`` (0-dim float),
    ``square_avg`` [, ``momentum_buffer`` if μ > 0] [, ``grad_avg`` if centered],
    each of shape ``S_i``; all zero when fresh.
    """
    return _apply(_rmsprop_one, params, grads, states, hypers)


def _rmsprop_one(p, g, st, h):
    lr, a, eps = h["lr"], h.get("alpha", 0.99), h.get("eps", 1e-8)
    wd, mu = h.get("weight_decay", 0.0), h.get("momentum", 0.0)
    if not _is_zero(wd):
        g = g + wd * p
    g_r = _real(g)
    s = a * _real(_buf(st, "square_avg", p)) + (1 - a) * g_r * g_r
    new_st: State = {"step": _next_step(st, p), "square_avg": _like(s, p)}
    if h.get("centered", False):
        ga = a * _real(_buf(st, "grad_avg", p)) + (1 - a) * g_r
        new_st["grad_avg"] = _like(ga, p)
        d = _safe_sqrt(s - ga * ga) + eps
    else:
        d = _safe_sqrt(s) + eps
    if _is_zero(mu):
        return _like(_real(p) - lr * g_r / d, p), new_st
    b = mu * _real(_buf(st, "momentum_buffer", p)) + g_r / d
    new_st["momentum_buffer"] = _like(b, p)
    return _like(_real(p) - lr * b, p), new_st


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[type, FunctionalStep] = {}


def register_functional_step(optimizer_cls: type, step: FunctionalStep) -> None:
    """Register ``step`` as the differentiable counterpart of ``optimizer_cls``.

    ``step`` must follow :class:`FunctionalStep` (including a ``state_keys``
    attribute).  Registration also covers subclasses without their own entry.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    if not callable(step):
        raise TypeError(f"step must be callable, got {step!r}")
    if not hasattr(step, "state_keys"):
        raise TypeError("step must have a `state_keys` attribute (tuple of per-parameter state keys)")
    _REGISTRY[optimizer_cls] = step


def supported_optimizers() -> list[str]:
    """Names of optimizer classes that currently have a registered functional step."""
    return sorted(f"{c.__module__}.{c.__qualname__}" for c in _REGISTRY)


_REQUIRED_KEYS = {
    sgd_step: ("lr",),
    adam_step: ("lr", "betas"),
    adamw_step: ("lr", "betas"),
    rmsprop_step: ("lr", "alpha"),
}


def functional_step_for(optimizer: torch.optim.Optimizer) -> FunctionalStep:
    """Return the differentiable step for ``optimizer`` (exact type first, then MRO).

    Raises:
        TypeError: no functional step is registered for the optimizer's class.
        ValueError: a param group lacks a hyper-parameter the step needs.
    """
    cls = type(optimizer)
    step = _REGISTRY.get(cls)
    if step is None:
        for base in cls.__mro__[1:]:
            if base in _REGISTRY:
                step = _REGISTRY[base]
                if getattr(cls, "step", None) is not getattr(base, "step", None):
                    warnings.warn(
                        f"{cls.__qualname__} overrides step() but inherits the functional step "
                        f"registered for {base.__qualname__}; register its own with "
                        "warpopt.task_optimizers.register_functional_step if the update "
                        "differs.",
                        stacklevel=2,
                    )
                break
    if step is None:
        raise TypeError(
            f"No differentiable functional step is available for optimizer "
            f"{cls.__module__}.{cls.__qualname__}. Supported: {', '.join(supported_optimizers())}. "
            "Register one with warpopt.task_optimizers.register_functional_step(OptimizerClass, step_fn), "
            "or use the approximate (first-order) WarpGrad meta-objective, which needs no optimizer step."
        )
    for gi, group in enumerate(optimizer.param_groups):
        missing = [k for k in _REQUIRED_KEYS.get(step, ()) if k not in group]
        if missing:
            raise ValueError(f"param group {gi} of {cls.__qualname__} lacks {missing}, needed by its step")
        if (
            step is sgd_step
            and group.get("nesterov", False)
            and (_is_zero(group.get("momentum", 0.0)) or not _is_zero(group.get("dampening", 0.0)))
        ):
            raise ValueError("SGD with nesterov=True requires momentum > 0 and dampening = 0")
    return step


register_functional_step(torch.optim.SGD, sgd_step)
register_functional_step(torch.optim.Adam, adam_step)
register_functional_step(torch.optim.AdamW, adamw_step)
register_functional_step(torch.optim.RMSprop, rmsprop_step)


# --------------------------------------------------------------------------- state I/O


def optimizer_states(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], copy: bool = False) -> list[State]:
    """Read ``optimizer.state[p]`` for each ``p`` in ``params`` (``{}`` if fresh).

    Tensors are returned as-is (they are the optimizer's *live* buffers, mutated by
    the next ``optimizer.step()``) unless ``copy=True``.  ``step`` is returned as a
    0-dim tensor with the param's real dtype (≥ float32) on the device where the optimizer
    keeps it (torch.optim keeps it on the CPU unless ``capturable``/``fused``): moving it
    to the parameter's GPU would be a host synchronisation at every recorded step.
    ``None`` entries are dropped.
    """
    out: list[State] = []
    for p in params:
        raw = optimizer.state.get(p, {})
        st: State = {}
        for k, v in raw.items():
            if v is None:
                continue
            if k == "step":
                v = torch.as_tensor(v).detach().to(dtype=_step_dtype(p))
            elif isinstance(v, Tensor) and copy:
                v = v.detach().clone()
            st[k] = v
        out.append(st)
    return out


def copy_state_dict(state: Any) -> Any:
    """A copy of an optimizer's ``state_dict()`` that later steps cannot change: dicts, lists and
    tuples copied, tensors cloned (detached), numbers, strings and None shared (immutable),
    anything else deep-copied. What ``copy.deepcopy`` gives for torch.optim's dicts, without its
    per-object bookkeeping (which dominates for many small state tensors)."""
    if isinstance(state, Tensor):
        return state.detach().clone()
    if type(state) is dict:
        return {k: copy_state_dict(v) for k, v in state.items()}
    if type(state) in (list, tuple):
        return type(state)(copy_state_dict(v) for v in state)
    if state is None or isinstance(state, (bool, int, float, complex, str, bytes)):
        return state
    return copy.deepcopy(state)


def load_optimizer_states(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], states: Sequence[Mapping[str, Tensor]]
) -> None:
    """Write ``states`` into ``optimizer.state`` for ``params`` (inverse of :func:`optimizer_states`).

    Tensors are detached and copied (the optimizer mutates its state in place), moved
    to the param's device, cast to its dtype and reshaped to its shape when they have
    as many elements.  ``step`` is restored the way torch 2.13 initialises it: a
    0-dim tensor of ``float32`` (or float64 when that is the default dtype; always
    float32 for ``fused``), on CPU unless the group is ``capturable``/``fused``.
    An empty mapping clears the parameter's state.
    """
    params = list(params)
    if len(params) != len(states):
        raise ValueError(f"got {len(params)} params but {len(states)} states")
    group_of = {id(q): g for g in optimizer.param_groups for q in g["params"]}
    for p, st in zip(params, states):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError("a parameter passed to load_optimizer_states is not managed by the optimizer")
        new: dict[str, Any] = {}
        for k, v in st.items():
            if k == "step":
                fused = bool(group.get("fused"))
                dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not fused else torch.float32
                device = p.device if fused or group.get("capturable") else torch.device("cpu")
                new[k] = torch.tensor(float(torch.as_tensor(v).item()), dtype=dtype, device=device)
            elif isinstance(v, Tensor):
                x = v.detach().to(device=p.device, copy=True)
                if x.is_floating_point() and p.is_floating_point() and x.dtype != p.dtype:
                    x = x.to(p.dtype)
                if x.shape != p.shape and x.numel() == p.numel():
                    x = x.reshape(p.shape)
                new[k] = x
            else:
                new[k] = v
        optimizer.state.pop(p, None)
        if new:
            optimizer.state[p] = new
