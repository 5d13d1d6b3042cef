"""Models that move: ``model.to(device)`` / ``model.double()`` after the optimizer was built.

``nn.Module.to`` converts parameters in place (the ``nn.Parameter`` objects stay; their data
changes device or dtype), so the task optimizer and φ's meta optimizer still hold the right
parameters, but what the meta-optimizer keeps beside the model does not move with it: θ0, the
initial buffers, learned hyper-parameters and the optimizers' state (Adam's moments). At each
``task()`` and ``meta_step()`` the shell calls ``follow``, which moves them to where the model's
parameters now are (state tensors as ``torch.optim.Optimizer.load_state_dict`` places them:
floating ones in the parameter's dtype, step counts where the optimizer keeps them).

Refused, with an error saying what to do, before anything changes: parameters *replaced* rather
than converted (the optimizers would hold stale tensors), and a move while the meta-batch holds
recorded points or accumulated meta-gradients in the old placement (move between meta-steps).
"""

from __future__ import annotations

import torch

from .meta_update import MetaParameters
from .partition import Model

__all__ = ["follow"]


def _placed(t: torch.Tensor, like: torch.Tensor) -> bool:
    return t.device == like.device and (t.dtype == like.dtype or not t.is_floating_point())


def _moved(core: Model, meta: MetaParameters) -> bool:
    if any(not _placed(t0, p) for t0, p in zip(core.theta0, core.adapt)):
        return True
    if any(not _placed(b0, b) for b0, b in zip(core.initial_buffers, core.live_buffers())):
        return True
    device = core.adapt[0].device if core.adapt else None
    if device is not None and any(v.device != device for v in core.learned.values()):
        return True
    return any(_state_misplaced(o) for o in [core.task_optimizer, *meta.optimizers()])


def _state_misplaced(optimizer: torch.optim.Optimizer | None) -> bool:
    if optimizer is None:
        return False
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step" and not _placed(value, p):
                return True
    return False


def _move_state(optimizer: torch.optim.Optimizer) -> None:
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p, state in optimizer.state.items():
        group = group_of.get(id(p), {})
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor):
                continue
            if key == "step":  # torch keeps step counts on the CPU unless capturable/fused
                if group.get("capturable") or group.get("fused"):
                    state[key] = value.to(p.device)
            elif value.is_floating_point():
                state[key] = value.to(device=p.device, dtype=p.dtype)
            else:
                state[key] = value.to(p.device)


def follow(core: Model, meta: MetaParameters, pending: bool) -> bool:
    """Move everything kept beside the model to the model's current device and dtypes; True if
    anything moved. ``pending``: the meta-batch holds points or meta-gradients (a move is refused)."""
    live = dict(core.module.named_parameters())
    replaced = [n for n, p in zip(core.adapt_names, core.adapt) if live.get(n) is not p]
    if replaced:
        raise RuntimeError(
            f"the model's parameters {replaced[:3]} are not the tensors this optimizer was built on "
            "(they were replaced, not converted in place): build a new WarpGradMetaOptimizer on the "
            "model as it is now and load the old one's state_dict() into it"
        )
    if not _moved(core, meta):
        return False
    if pending:
        raise RuntimeError(
            "the model moved (device or dtype) while the meta-batch holds recorded points or "
            "meta-gradients in its old placement: call meta_step() before moving the model (or move "
            "it back); between meta-steps θ0, the meta optimizers' state and learned "
            "hyper-parameters follow the model"
        )
    with torch.no_grad():
        for t0, p in zip(core.theta0, core.adapt):
            if not _placed(t0, p):
                t0.data = t0.data.to(device=p.device, dtype=p.dtype)  # same Parameter: θ0's optimizer keeps it
        for i, (b0, b) in enumerate(zip(core.initial_buffers, core.live_buffers())):
            if not _placed(b0, b):
                core.initial_buffers[i] = b0.to(device=b.device, dtype=b.dtype if b0.is_floating_point() else b0.dtype)
        device = core.adapt[0].device
        for v in core.learned.values():
            if v.device != device:
                v.data = v.data.to(device)
    for optimizer in [core.task_optimizer, *meta.optimizers()]:
        _move_state(optimizer)
    return True
