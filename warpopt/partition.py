"""The model's partition and the task optimizer, as the meta-optimizer wires them.

``build`` splits a (warped) module into θ (adapt parameters, the task optimizer's; Eq. 2),
φ (warp parameters; frozen while a task adapts) and meta-learned task hyper-parameters, builds
the task optimizer from the user's class (its update rule checked to be replayable: Eq. 7/8
replay it functionally) and θ0, where tasks start (Eq. 9). ``Model`` holds the result; the task
session (``warpopt.session``) adapts it, the meta update (``warpopt.meta_update``) changes φ and θ0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import warping
from .objectives import ReplayContext
from .task_optimizers import functional_step_for, optimizer_states

__all__ = ["Model", "build", "task_groups"]


@dataclass
class Model:
    """The model's partition and the task optimizer, as the meta-optimizer wires them.

    ``adapt``/``adapt_names``: θ (task-adapted); ``warp``: φ; ``learned``: meta-learned task
    hyper-parameters; ``theta0``/``initial_buffers``: where tasks start.
    """

    module: nn.Module
    adapt: list[nn.Parameter]
    adapt_names: list[str]
    buffer_names: list[str]
    warp: list[nn.Parameter]
    learned: dict[str, nn.Parameter]
    task_optimizer: torch.optim.Optimizer
    step_fn: Callable[..., Any]
    theta0: list[nn.Parameter]
    initial_buffers: list[torch.Tensor]
    # The loop side (issue 14): the clipping ``clip_grad_norm_`` asked for the next step, how
    # many tasks have begun (the step check samples them), the mismatches already reported.
    clip: tuple[float, float] | None = None
    tasks_begun: int = 0
    reported: set = field(default_factory=set)

    def meta_parameters(self) -> list[nn.Parameter]:
        """What the warp objective differentiates: φ and learned hyper-parameters."""
        return self.warp + list(self.learned.values())

    def live_buffers(self) -> list[torch.Tensor]:
        if not self.buffer_names:  # (no walk of the module tree, at every task and meta-step)
            return []
        named = dict(self.module.named_buffers())
        return [named[n] for n in self.buffer_names]

    def states(self) -> list[dict[str, torch.Tensor]]:
        return optimizer_states(self.task_optimizer, self.adapt)

    def context(self) -> ReplayContext:
        """Functional view of the model and the task update rule for replay (Eq. 7/8)."""
        groups = self.task_optimizer.param_groups
        index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        hypers = [
            {**groups[index[id(p)]], **self.learned} if self.learned else groups[index[id(p)]] for p in self.adapt
        ]
        return ReplayContext(
            self.module,
            self.adapt_names,
            self.buffer_names,
            self.step_fn,
            hypers,
            [index[id(p)] for p in self.adapt],
            dict(self.learned),
        )


def task_groups(params: Iterable[Any] | None, named_adapt: list) -> list[dict[str, Any]]:
    """Param groups for the task optimizer: all adapt parameters, or the user's groups (checked).

    Parameters frozen when the optimizer is built (``requires_grad=False``) are left out: a task
    step never changes them (``torch.optim`` skips a parameter without a gradient), so neither may
    the replayed step nor a θ0 update; they stay constants of the model."""
    adapt_ids = {id(p) for _, p in named_adapt}
    if params is None:
        trainable = [p for _, p in named_adapt if p.requires_grad]
        if not trainable:
            raise ValueError(
                "the warped model has no adapt parameters to train on tasks"
                + (" (all of them are frozen: requires_grad=False)" if named_adapt else "")
            )
        return [{"params": trainable}]
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    for group in groups:
        group_params = group["params"]
        group_params = [group_params] if isinstance(group_params, torch.Tensor) else list(group_params)
        for p in group_params:
            if id(p) not in adapt_ids:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} passed in params is not an adapt "
                    "parameter of the warped model; pass parameters from model.adapt_parameters()"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} passed in params is frozen (requires_grad="
                    "False): tasks would never change it, so it cannot be adapted; leave it out"
                )
        group["params"] = group_params
    return groups


def _partition(module: nn.Module) -> tuple[list, list, list]:
    """(named adapt parameters, warp parameters, adapt buffer names); an unwarped model is all θ."""
    if not warping.is_warped(module):
        inner = [n for n, m in module.named_modules() if n and warping.is_warped(m)]
        if inner:  # its warp layers would be taken for task parameters: adapted, never meta-learned
            spec = warping._spec(module.get_submodule(inner[0]))
            where = [f"{inner[0]}.{w.target}" for w in spec.inserted]
            designated = [f"{inner[0]}.{n}" for n in spec.designated]
            same = ", ".join([f"where={where!r}"] * bool(where) + [f"designate={designated!r}"] * bool(designated))
            raise ValueError(
                f"{type(module).__name__} is not warped but its submodule {inner[0]!r} is: the optimizer "
                "reads the θ/φ split off the model it is given, so those warp layers would be adapted as "
                f"task parameters. Give it the warped submodule, or warpopt.unwarp(model.{inner[0]}) and "
                f"warp the whole model the same way: warpopt.warp(model, {same}) (with the same layer=)"
            )
        return list(module.named_parameters()), [], [n for n, _ in module.named_buffers()]
    return (
        list(warping.named_adapt_parameters(module)),
        [p for _, p in warping.named_warp_parameters(module)],
        [n for n, _ in warping.named_adapt_buffers(module)],
    )


def build(
    module: nn.Module,
    params: Any | None,
    task_optimizer: Callable[..., torch.optim.Optimizer],
    lr: float,
    task_kwargs: dict[str, Any],
    learn_lr: bool,
    learn_momentum: bool,
) -> Model:
    """Partition ``module``, build the task optimizer (checked: its update rule must be
    replayable), θ0 and the learned hyper-parameters."""
    # torch.compile(model) wraps the module: the loop may call the compiled one, the replay runs
    # the original (Eq. 7 needs double backward, which compiled graphs do not support).
    module = getattr(module, "_orig_mod", module) if type(module).__name__ == "OptimizedModule" else module
    named_adapt, warp_params, buffer_names = _partition(module)
    inner = task_optimizer(task_groups(params, named_adapt), lr=lr, **task_kwargs)
    step_fn = functional_step_for(inner)  # fails now, before any state exists, if U cannot be replayed
    ids = {id(p) for g in inner.param_groups for p in g["params"]}
    adapt = [(n, p) for n, p in named_adapt if id(p) in ids]
    device = adapt[0][1].device
    with torch.no_grad():
        theta0 = [nn.Parameter(p.detach().clone()) for _, p in adapt]
        buffers = dict(module.named_buffers())
        initial_buffers = [buffers[n].detach().clone() for n in buffer_names]
    learned: dict[str, nn.Parameter] = {}
    for key, wanted in (("lr", learn_lr), ("momentum", learn_momentum)):
        if wanted:
            if key not in inner.param_groups[0]:
                raise ValueError(f"learn_{key} needs a task optimizer with a {key!r} hyper-parameter")
            learned[key] = nn.Parameter(torch.tensor(float(inner.param_groups[0][key]), device=device))
    return Model(
        module,
        [p for _, p in adapt],
        [n for n, _ in adapt],
        buffer_names,
        warp_params,
        learned,
        inner,
        step_fn,
        theta0,
        initial_buffers,
    )
