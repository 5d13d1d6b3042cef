"""Helpers of ``examples/fewshot.py``: the Warp-MAML partition of the task learner (WarpGrad
Appendix H). The MAML/FOMAML baselines are the library's θ0-only meta-learning of the plain net
(``WarpGradMetaOptimizer(net, initialisation=warpopt.maml())``). Evaluation is ``harness.evaluate``.

Task learner (``harness.ConvNet``): blocks of 3x3 conv (stride 1, padding 1) -> BatchNorm with
learned scale/offset -> ReLU -> 2x2 max-pool, then a linear head. BatchNorm always normalises
with the statistics of the batch it sees (``track_running_stats=False``), the usual few-shot MAML
setting: the support set while adapting, the query set when it is evaluated.

Warp-MAML (Appendix H): a 3x3 conv warp layer follows each of the last conv layers; the first
block (conv + BN) and the warp layers are meta-learned (warp parameters), the other conv
layers, their BN scale/offset and the head are adapted (task parameters).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import warpopt
from harness import ConvNet


def backbone(in_channels: int, filters: Sequence[int], ways: int, image_size: int) -> ConvNet:
    """The few-shot task learner: MAML's blocks (conv -> BN with batch statistics -> ReLU -> pool)
    and a linear head; with more than four blocks the last one does not pool (multi-shot, 6 blocks)."""
    pools = len(filters) if len(filters) <= 4 else len(filters) - 1
    return ConvNet(in_channels, filters, ways, image_size, pools=pools, pool="last", batch_stats=True)


def warp_convnet(net: ConvNet, after: str = "conv") -> nn.Module:
    """Warp-MAML partition of ``net`` (Appendix H).

    A linear 3x3 conv warp layer (``warpopt.ConvWarp``, identity at init, as many filters as
    the conv it follows) is inserted after every block but the first: right after its conv
    layer (``after="conv"``, Appendix H: "the last 3 convolutional layers were followed by
    warp layers") or after the whole block (``after="block"``, Section 4.1: "after each task
    block"). The first block (conv + BN) is designated meta-learned; everything else is adapted.
    """
    if after not in ("conv", "block"):
        raise ValueError(f"after must be 'conv' or 'block', got {after!r}")
    suffix = ".conv" if after == "conv" else ""
    targets = {f"features.{i}{suffix}" for i in range(1, len(net.features))}
    return warpopt.warp(net, where=lambda name, module: name in targets, layer=warpopt.ConvWarp,
                        designate=["features.0"])


# ---------------------------------------------------------------------------- functional helpers
def sgd_adapt(model: nn.Module, params: dict[str, torch.Tensor], batches: Callable[[int], tuple],
              steps: int, lr: float, momentum: float = 0.0, create_graph: bool = False,
              on_step: Optional[Callable[[int, dict], None]] = None) -> dict[str, torch.Tensor]:
    """``steps`` SGD (heavy-ball) steps on ``params`` (the adapted ones; others stay live).

    ``create_graph``: keep the graph through the steps (second-order MAML); otherwise the
    gradients are detached (first order when ``params`` require grad; plain adaptation else).
    ``on_step(k, params)`` is called after step k = 1..steps (learning curves, Fig. 8).
    """
    names = list(params)
    theta = [params[n] for n in names]
    bufs: list[Optional[torch.Tensor]] = [None] * len(theta)
    for k in range(steps):
        x, y = batches(k)
        with torch.enable_grad():
            live = theta if create_graph or any(t.requires_grad for t in theta) else \
                [t.detach().requires_grad_(True) for t in theta]
            loss = F.cross_entropy(functional_call(model, dict(zip(names, live)), (x,)), y)
            grads = torch.autograd.grad(loss, live, create_graph=create_graph)
        if not create_graph:
            grads = [g.detach() for g in grads]
        if momentum:
            bufs = [g if b is None else momentum * b + g for b, g in zip(bufs, grads)]
            grads = bufs
        theta = [t - lr * g for t, g in zip(theta, grads)]
        if not create_graph and not any(p.requires_grad for p in params.values()):
            theta = [t.detach() for t in theta]
        if on_step is not None:
            on_step(k + 1, dict(zip(names, theta)))
    return dict(zip(names, theta))


def _warps(model: nn.Module) -> list[torch.Tensor]:
    return list(model.warp_parameters()) if warpopt.is_warped(model) else []  # MAML/FOMAML: none


def warp_state(model: nn.Module, opt: "warpopt.WarpGradMetaOptimizer") -> dict:
    """θ0 and φ of a learner (for early stopping)."""
    return {"theta0": [t.detach().clone() for t in opt.theta0], "warp": [p.detach().clone() for p in _warps(model)]}


def load_warp_state(model: nn.Module, opt: "warpopt.WarpGradMetaOptimizer", state: dict) -> None:
    with torch.no_grad():
        for t, s in zip(opt.theta0, state["theta0"]):
            t.copy_(s)
        for p, s in zip(_warps(model), state["warp"]):
            p.copy_(s)
