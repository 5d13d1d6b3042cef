"""What a task step used besides θ_k and the optimizer state: the hyper-parameters a scheduler
may change (lr, momentum, betas, ...) and the gradient clipping (U in Eq. 7 as it was taken).

Eq. 7 replays U(θ_k, ∇L_task(θ_k; φ)) with the update rule of *the step taken* from θ_k. A
learning-rate scheduler changes the param groups between steps, and ``opt.clip_grad_norm_``
clips one step's gradients; both are recorded per step, host-side (a few floats per param group,
deduplicated: consecutive steps with the same values share one object), and the replay of θ_k
uses the values of step k (θ_K: those the next step would use, i.e. the groups at the task's
end). Nothing here touches the recorded tensors (``warpopt.points``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StepHypers", "capture", "hypers_at", "to_plain", "from_plain"]

Entry = tuple[str, Any]


@dataclass(frozen=True)
class StepHypers:
    """The numeric hyper-parameters of each param group at one step, and the step's clipping.

    ``groups[i]``: the i-th param group's ``(key, value)`` pairs (floats, ints, bools and tuples
    of numbers such as ``betas``); ``clip``: ``(max_norm, norm_type)`` when the step's gradients
    were clipped by ``opt.clip_grad_norm_``. Hashable: replays group samples by it.
    """

    groups: tuple[tuple[Entry, ...], ...]
    clip: tuple[float, float] | None = None


def _plain(value: Any) -> Any:
    """``value`` if it is a host number (or a tuple of them), else ``None`` (not recorded)."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        return value.item()  # a tensor lr (capturable optimizers): one host read per step
    if isinstance(value, tuple) and value and all(_plain(v) is not None for v in value):
        return tuple(_plain(v) for v in value)
    return None


def capture(
    optimizer: torch.optim.Optimizer, clip: tuple[float, float] | None, previous: StepHypers | None = None
) -> StepHypers:
    """The optimizer's numeric group hyper-parameters now, with ``clip``; ``previous`` is
    returned instead of an equal new object (consecutive steps usually agree)."""
    groups = tuple(
        tuple((k, v) for k, v in ((k, _plain(v)) for k, v in g.items() if k != "params") if v is not None)
        for g in optimizer.param_groups
    )
    if previous is not None and previous.groups == groups and previous.clip == clip:
        return previous
    return StepHypers(groups, clip)


def hypers_at(
    base: Sequence[Mapping[str, Any]], group_index: Sequence[int], recorded: StepHypers, learned: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Per adapt parameter, its param group's hyper-parameters at the recorded step: the live
    group (``base``, for keys that are not numbers) updated with the recorded values, then the
    learned hyper-parameters (tensors: the exact objective differentiates through them)."""
    out = []
    for i, b in enumerate(base):
        g = group_index[i] if i < len(group_index) else 0
        values = dict(recorded.groups[g]) if g < len(recorded.groups) else {}
        out.append({**b, **values, **learned})
    return out


def to_plain(h: StepHypers | None) -> dict[str, Any] | None:
    """Lists, dicts and numbers only (a checkpoint loads it without unpickling objects)."""
    if h is None:
        return None
    return {
        "groups": [[[k, list(v) if isinstance(v, tuple) else v] for k, v in g] for g in h.groups],
        "clip": None if h.clip is None else list(h.clip),
    }


def from_plain(d: Mapping[str, Any] | None) -> StepHypers | None:
    if d is None:
        return None
    groups = tuple(tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in g) for g in d["groups"])
    return StepHypers(groups, None if d["clip"] is None else (float(d["clip"][0]), float(d["clip"][1])))
