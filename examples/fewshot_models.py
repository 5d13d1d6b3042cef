"""Helpers of ``examples/fewshot.py``: the conv task learner, the MAML/FOMAML baselines and
episodic evaluation (WarpGrad Appendix H).

Task learner: blocks of 3x3 conv (stride 1, padding 1) -> BatchNorm with learned scale/offset
-> ReLU -> 2x2 max-pool, then a linear head. BatchNorm always normalises with the statistics
of the batch it sees (``track_running_stats=False``), the usual few-shot MAML setting: the
support set while adapting, the query set when it is evaluated.

Warp-MAML (Appendix H): a 3x3 conv warp layer follows each of the last conv layers; the first
block (conv + BN) and the warp layers are meta-learned (warp parameters), the other conv
layers, their BN scale/offset and the head are adapted (task parameters).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import warpopt


class ConvBlock(nn.Module):
    """3x3 conv -> (warp) -> BN(affine) -> ReLU -> (2x2 max-pool)."""

    def __init__(self, cin: int, cout: int, pool: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout, track_running_stats=False)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.norm(self.conv(x))))


class ConvNet(nn.Module):
    """``len(channels)`` conv blocks (the first ``pools`` with max-pooling) and a linear head."""

    def __init__(self, in_channels: int, channels: Sequence[int], num_classes: int, image_size: int,
                 pools: Optional[int] = None) -> None:
        super().__init__()
        pools = len(channels) if pools is None else pools
        blocks, cin, size = [], in_channels, image_size
        for i, cout in enumerate(channels):
            blocks.append(ConvBlock(cin, cout, pool=i < pools))
            cin, size = cout, (size // 2 if i < pools else size)
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(cin * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.features(x)))


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


class MAMLBaseline:
    """MAML (Finn et al., 2017) and first-order MAML on the plain backbone, with torch.func.

    ``WarpGradMetaOptimizer`` needs at least one warp parameter, so the baselines have their
    own loop: θ0 = every parameter of ``net``; K SGD steps on the support set (the full set
    each step); L_meta on the query set; Adam on the mean query loss over the meta-batch.
    ``first_order``: the K-step graph is not kept (FOMAML).
    """

    def __init__(self, net: nn.Module, lr: float, meta_lr: float, steps: int, first_order: bool = False,
                 momentum: float = 0.0) -> None:
        self.net, self.lr, self.steps, self.first_order, self.momentum = net, lr, steps, first_order, momentum
        self.meta_optimizer = torch.optim.Adam(net.parameters(), lr=meta_lr)

    def adapt_names(self) -> list[str]:
        return [n for n, _ in self.net.named_parameters()]

    def theta0(self) -> dict[str, torch.Tensor]:
        return dict(self.net.named_parameters())

    def meta_step(self, tasks: Iterable[tuple[Callable[[int], tuple], tuple]]) -> float:
        self.meta_optimizer.zero_grad()
        losses = []
        tasks = list(tasks)
        for support, (qx, qy) in tasks:
            theta = sgd_adapt(self.net, self.theta0(), support, self.steps, self.lr, self.momentum,
                              create_graph=not self.first_order)
            loss = F.cross_entropy(functional_call(self.net, theta, (qx,)), qy) / len(tasks)
            loss.backward()
            losses.append(loss.item())
        self.meta_optimizer.step()
        return float(sum(losses))

    def state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load(self, state: dict) -> None:
        self.net.load_state_dict(state)


def warp_state(model: nn.Module, opt: "warpopt.WarpGradMetaOptimizer") -> dict:
    """θ0 and φ of a Warp-MAML learner (for early stopping)."""
    return {"theta0": [t.detach().clone() for t in opt.theta0],
            "warp": [p.detach().clone() for p in model.warp_parameters()]}


def load_warp_state(model: nn.Module, opt: "warpopt.WarpGradMetaOptimizer", state: dict) -> None:
    with torch.no_grad():
        for t, s in zip(opt.theta0, state["theta0"]):
            t.copy_(s)
        for p, s in zip(model.warp_parameters(), state["warp"]):
            p.copy_(s)


def evaluate(model: nn.Module, names: Sequence[str], theta0: Sequence[torch.Tensor], episodes: Iterable,
             steps: int, lr: float, device: torch.device, momentum: float = 0.0, batch_size: Optional[int] = None,
             seed: int = 0, progress: Optional[Callable] = None, curve_every: Optional[int] = None) -> dict:
    """Adapt from θ0 on each episode's support set, then accuracy on its query set.

    ``batch_size``: None uses the full support set at every step (few-shot); otherwise random
    mini-batches of that size (multi-shot). Returns mean accuracy (%) with its 95% confidence
    interval 1.96 * std / sqrt(n) (std with ddof=1) over episodes. ``curve_every``: also the
    query accuracy at steps 0, e, 2e, ... (mean over episodes) as ``curve`` (Fig. 8 learning curves).
    """
    accs, curves = [], []
    g = torch.Generator().manual_seed(seed)
    start = {n: t.detach() for n, t in zip(names, theta0)}
    it = episodes if progress is None else progress(episodes)
    for ep in it:
        ep = ep.to(device)
        if batch_size is None:
            support = lambda k, ep=ep: (ep.support_x, ep.support_y)  # noqa: E731
        else:
            def support(k, ep=ep):
                idx = torch.randint(ep.support_x.shape[0], (batch_size,), generator=g).to(device)
                return ep.support_x[idx], ep.support_y[idx]
        record = None
        if curve_every:
            curves.append([_query_accuracy(model, start, ep)])
            record = lambda k, th: curves[-1].append(_query_accuracy(model, th, ep)) \
                if k % curve_every == 0 else None  # noqa: E731
        theta = sgd_adapt(model, dict(start), support, steps, lr, momentum, on_step=record)
        accs.append(_query_accuracy(model, theta, ep))
    a = np.asarray(accs)
    ci = 1.96 * a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    out = {"accuracy": float(a.mean()), "ci95": float(ci), "episodes": len(a), "per_episode": a.tolist()}
    if curve_every:
        out["curve"] = {"steps": list(range(0, steps + 1, curve_every)),
                        "accuracy": np.asarray(curves).mean(0).tolist()}
    return out


def _query_accuracy(model: nn.Module, theta: dict, ep) -> float:
    with torch.no_grad():
        pred = functional_call(model, theta, (ep.query_x,)).argmax(-1)
    return (pred == ep.query_y).float().mean().item() * 100.0
