"""Gradient clipping by norm, taken in the task loop and replayed differentiably (Eq. 7).

The task loop clips with ``opt.clip_grad_norm_(max_norm)`` (``torch.nn.utils.clip_grad_norm_``
on the adapt parameters, recorded with the step). The replay applies the same map to the
replayed task gradient g(θ_k; φ):

    clip(g) = g · min(1, max_norm / (‖g‖ + 1e-6))

(torch's formula, the 1e-6 included). The factor is a function of φ through g, so the exact
objective differentiates through it; while the norm is under ``max_norm`` the factor is 1 and
contributes no gradient, as in the loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["clip_coefficient", "clip_gradients", "check_max_norm"]

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def check_max_norm(max_norm: float, norm_type: float) -> tuple[float, float]:
    """Validated ``(max_norm, norm_type)`` as floats (a bad value raises before anything changes)."""
    try:
        max_norm, norm_type = float(max_norm), float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"max_norm and norm_type must be numbers, got {max_norm!r}, {norm_type!r}") from None
    if math.isnan(max_norm) or max_norm < 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm}")
    if math.isnan(norm_type) or norm_type <= 0:
        raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type}")
    return max_norm, norm_type


def clip_coefficient(grads: Sequence[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """min(1, max_norm / (‖grads‖ + 1e-6)), a 0-dim tensor differentiable in the gradients.

    ``‖grads‖`` is the ``norm_type``-norm of all gradients together (of the per-tensor norms, as
    torch computes it)."""
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])
    total = torch.linalg.vector_norm(norms, norm_type)
    return (max_norm / (total + EPS)).clamp(max=1.0)


def clip_gradients(grads: Sequence[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> list[torch.Tensor]:
    """The gradients scaled by ``clip_coefficient`` (out of place, differentiable; valid under vmap)."""
    grads = list(grads)
    if not grads:
        return grads
    coefficient = clip_coefficient(grads, max_norm, norm_type)
    return [g * coefficient.to(g.dtype) for g in grads]
