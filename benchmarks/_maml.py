"""Second-order MAML, one meta-step, through warpopt and through each peer library.

Setting (MAML's Omniglot 5-way 1-shot): the 4-block conv net with 32 filters (BatchNorm on batch
statistics, no buffers), 5 SGD task steps at lr 0.4 on the support set (5 images), the query
loss (15 per class) at the adapted point, the meta-gradient averaged over a meta-batch of tasks,
one meta-optimizer step on θ0. Every contender owns a deep copy of the same network, so with
``torch.optim.SGD(lr=1)`` as meta optimizer θ0 after one meta-step is θ0 − (meta-gradient) in
all of them and the meta-gradients can be compared.

Contenders (each ``Contender(net, setting, meta_optimizer, meta_lr)`` with ``meta_step(tasks)``
and ``learned() -> {name: tensor}``, θ0 and, for Warp-MAML, φ):

- ``warpopt``: ``WarpGradMetaOptimizer(..., initialisation=warpopt.maml())`` with the task loop in
  the user's style (``opt.zero_grad(); loss.backward(); opt.step()``) and ``opt.meta_step()``.
  No warp learning (the base ``Algorithm``: no recording, no warp meta-gradient). A model
  without warp parameters is tried first; while the optimizer refuses one, an identity
  ``ScaleWarp`` on the head (10 parameters, never trained) is the smallest legal warp.
- ``torch``: hand-written functional MAML (``torch.func.functional_call`` + ``autograd.grad``
  with ``create_graph``): the work every second-order MAML must do, done once.
- ``torch-add``: the same with the one-op update ``torch.add(p, g, alpha=-lr)`` (warpopt's SGD
  step): warpopt's kernels without any bookkeeping.
- ``higher``: ``higher.innerloop_ctx`` with a differentiable SGD.
- ``torchopt``: ``torchopt.MetaSGD`` on the module, state extracted/recovered per task.
- ``learn2learn``: ``learn2learn.algorithms.MAML`` (``clone()`` / ``adapt()``).

Warp-MAML (WarpGrad with C_MAML, ``online()`` and the exact objective, Appendix H), over a
``warp(net) -> warped model`` given as ``warp=``: ``WarpMAML`` through warpopt and
``TorchWarpMAML`` written by hand (the reference its meta-gradient is checked against).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import sys
import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import warpopt
from _common import omniglot_net

Batch = tuple[torch.Tensor, torch.Tensor]
Episode = tuple[Batch, Batch]  # (support, query)


@dataclasses.dataclass(frozen=True)
class Setting:
    ways: int = 5
    shots: int = 1
    queries: int = 15
    steps: int = 5
    meta_batch: int = 4
    lr: float = 0.4
    filters: int = 32


def fewshot_net(s: Setting, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    return omniglot_net(s.ways, s.filters, running_stats=False).to(device=device, dtype=dtype)


def episodes(s: Setting, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             generator: Optional[torch.Generator] = None, count: Optional[int] = None) -> list[Episode]:
    """``count`` (default: the meta-batch) random N-way K-shot episodes of 28×28 images."""
    out = []
    for _ in range(s.meta_batch if count is None else count):
        xs = torch.randn(s.ways * s.shots, 1, 28, 28, generator=generator, dtype=dtype)
        xq = torch.randn(s.ways * s.queries, 1, 28, 28, generator=generator, dtype=dtype)
        ys = torch.arange(s.ways).repeat(s.shots)
        yq = torch.arange(s.ways).repeat(s.queries)
        out.append(((xs.to(device), ys.to(device)), (xq.to(device), yq.to(device))))
    return out


class Contender:
    """One MAML implementation over its own copy of ``net``."""

    name = "?"

    def __init__(self, net: nn.Module, s: Setting, meta_optimizer: Callable = torch.optim.Adam,
                 meta_lr: float = 1e-3) -> None:
        self.s = s
        self.net = copy.deepcopy(net)
        self.meta_opt = meta_optimizer(self.net.parameters(), lr=meta_lr)

    def meta_step(self, tasks: list[Episode]) -> None:
        self.meta_opt.zero_grad()
        for support, query in tasks:
            self.task(support, query, len(tasks))
        self.meta_opt.step()

    def task(self, support: Batch, query: Batch, n: int) -> None:
        """Adapt on ``support``; backward of the query loss / n into ``self.net``'s ``.grad``."""
        raise NotImplementedError

    def learned(self) -> dict[str, torch.Tensor]:
        """The meta-learned parameters by name: θ0 (and φ where warps are learned)."""
        return {k: v.detach() for k, v in self.net.named_parameters()}


class TorchMAML(Contender):
    name = "torch"

    def task(self, support: Batch, query: Batch, n: int) -> None:
        (xs, ys), (xq, yq) = support, query
        theta = dict(self.net.named_parameters())
        for _ in range(self.s.steps):
            loss = F.cross_entropy(functional_call(self.net, theta, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            theta = {k: p - self.s.lr * g for (k, p), g in zip(theta.items(), grads)}
        (F.cross_entropy(functional_call(self.net, theta, (xq,)), yq) / n).backward()


class TorchAddMAML(TorchMAML):
    """The hand-written MAML with the one-op update ``torch.add(p, g, alpha=-lr)`` (torch.optim.SGD's
    op and warpopt's): one op and one backward node per parameter update where ``p - lr * g`` takes
    two. Not a peer: the floor for warpopt's kernels, a MAML without any bookkeeping."""

    name = "torch-add"

    def task(self, support: Batch, query: Batch, n: int) -> None:
        (xs, ys), (xq, yq) = support, query
        theta = dict(self.net.named_parameters())
        for _ in range(self.s.steps):
            loss = F.cross_entropy(functional_call(self.net, theta, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            theta = {k: torch.add(p, g, alpha=-self.s.lr) for (k, p), g in zip(theta.items(), grads)}
        (F.cross_entropy(functional_call(self.net, theta, (xq,)), yq) / n).backward()


class HigherMAML(Contender):
    name = "higher"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import higher
        self.higher = higher
        self.inner = torch.optim.SGD(self.net.parameters(), lr=self.s.lr)

    def task(self, support: Batch, query: Batch, n: int) -> None:
        (xs, ys), (xq, yq) = support, query
        with self.higher.innerloop_ctx(self.net, self.inner, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(self.s.steps):
                diffopt.step(F.cross_entropy(fnet(xs), ys))
            (F.cross_entropy(fnet(xq), yq) / n).backward()


class TorchoptMAML(Contender):
    name = "torchopt"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import torchopt
        self.torchopt = torchopt
        self.inner = torchopt.MetaSGD(self.net, lr=self.s.lr)

    def meta_step(self, tasks: list[Episode]) -> None:
        to = self.torchopt
        self.net_state, self.opt_state = to.extract_state_dict(self.net), to.extract_state_dict(self.inner)
        super().meta_step(tasks)

    def task(self, support: Batch, query: Batch, n: int) -> None:
        (xs, ys), (xq, yq) = support, query
        for _ in range(self.s.steps):
            self.inner.step(F.cross_entropy(self.net(xs), ys))
        (F.cross_entropy(self.net(xq), yq) / n).backward()
        self.torchopt.recover_state_dict(self.net, self.net_state)
        self.torchopt.recover_state_dict(self.inner, self.opt_state)


def learn2learn_maml() -> type:
    """learn2learn's ``MAML`` class.

    ``import learn2learn`` also imports its vision, gym and text sub-packages (torchvision, gym,
    qpth), and no torchvision wheel on PyPI loads against a CPU build of torch 2.13. The MAML
    class needs only ``algorithms/maml.py``, ``algorithms/base_learner.py`` and ``utils/``: when
    the full import fails, those are imported from the installed package alone, unchanged.
    """
    try:
        from learn2learn.algorithms import MAML
        return MAML
    except Exception:  # ImportError, or a torchvision built for another torch failing to load
        for name in [m for m in sys.modules if m == "learn2learn" or m.startswith("learn2learn.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("learn2learn is not installed (see benchmarks/README.md for how to install it)")
    root = next(iter(spec.submodule_search_locations))
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", f"{root}/algorithms")):
        package = types.ModuleType(name)
        package.__path__ = [path]  # a package whose __init__ is not run
        sys.modules[name] = package
    return importlib.import_module("learn2learn.algorithms.maml").MAML


class Learn2learnMAML(Contender):
    name = "learn2learn"

    def __init__(self, net: nn.Module, s: Setting, meta_optimizer: Callable = torch.optim.Adam,
                 meta_lr: float = 1e-3) -> None:
        self.s = s
        self.net = learn2learn_maml()(copy.deepcopy(net), lr=s.lr, first_order=False)
        self.meta_opt = meta_optimizer(self.net.parameters(), lr=meta_lr)

    def task(self, support: Batch, query: Batch, n: int) -> None:
        (xs, ys), (xq, yq) = support, query
        learner = self.net.clone()
        for _ in range(self.s.steps):
            learner.adapt(F.cross_entropy(learner(xs), ys))
        (F.cross_entropy(learner(xq), yq) / n).backward()

    def learned(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.net.module.named_parameters()}


def no_warp_learning() -> warpopt.algorithms.Algorithm:
    """The algorithm that learns no warp: tasks reset to θ0, nothing is recorded or replayed."""
    return warpopt.algorithms.Algorithm()


def warpopt_model(net: nn.Module, lr: float, **kwargs) -> tuple[nn.Module, warpopt.WarpGradMetaOptimizer, str]:
    """The θ0-only MAML learner: (model, optimizer, how the model was made legal)."""
    try:  # a model without warp parameters (once the optimizer accepts one)
        model = copy.deepcopy(net)
        return model, warpopt.WarpGradMetaOptimizer(model, lr=lr, **kwargs), "no warp parameters"
    except (TypeError, ValueError) as refusal:
        reason = str(refusal)
    head = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    model = warpopt.warp(copy.deepcopy(net), where=lambda name, m: name == head, layer=warpopt.ScaleWarp)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=lr, **kwargs)
    return model, opt, f"identity ScaleWarp on the head, never trained (without one: {reason})"


class WarpoptMAML(Contender):
    name = "warpopt"
    learns_warps = False

    def __init__(self, net: nn.Module, s: Setting, meta_optimizer: Callable = torch.optim.Adam,
                 meta_lr: float = 1e-3) -> None:
        self.s = s
        self.model, self.opt, self.how = warpopt_model(
            net, s.lr, meta_optimizer=meta_optimizer, meta_lr=meta_lr, init_lr=meta_lr,
            algorithm=no_warp_learning(), initialisation=warpopt.maml())
        self.names = list(self.opt.core.adapt_names)  # an unwarped model's parameters are all θ

    def meta_step(self, tasks: list[Episode]) -> None:
        for support, query in tasks:
            xs, ys = support
            with self.opt.task(lambda k, b=support: b, F.cross_entropy, meta_data=lambda k, b=query: b):
                for _ in range(self.s.steps):
                    self.opt.zero_grad()
                    F.cross_entropy(self.model(xs), ys).backward()
                    self.opt.step()
        self.opt.meta_step()

    def learned(self) -> dict[str, torch.Tensor]:
        theta0 = {k: v.detach() for k, v in zip(self.names, self.opt.theta0)}
        if not self.learns_warps:
            return theta0
        return {**theta0, **{k: v.detach() for k, v in self.model.named_warp_parameters()}}


class WarpMAML(WarpoptMAML):
    """Warp-MAML through warpopt: ``online()``, ``exact``, ``maml()``, the user's task loop."""

    name = "warp-maml"
    learns_warps = True

    def __init__(self, net: nn.Module, s: Setting, meta_optimizer: Callable = torch.optim.Adam,
                 meta_lr: float = 1e-3, *, warp: Callable[[nn.Module], nn.Module]) -> None:
        self.s = s
        self.model = warp(copy.deepcopy(net))
        self.opt = warpopt.WarpGradMetaOptimizer(
            self.model, lr=s.lr, meta_optimizer=meta_optimizer, meta_lr=meta_lr, init_lr=meta_lr,
            objective=warpopt.exact, algorithm=warpopt.online(), initialisation=warpopt.maml())
        self.names = [k for k, _ in self.model.named_adapt_parameters()]


class TorchWarpMAML(Contender):
    """Warp-MAML by hand, each term computed separately as the paper writes it.

    φ: the mean over tasks and steps k of ∇_φ L_meta(θ_k − α ∇L_task(θ_k; φ); φ) with θ_k held
    fixed (Eq. 7 at the live point, Algorithm 1). θ0: MAML through the K steps, φ fixed.
    """

    name = "warp-maml by hand"

    def __init__(self, net: nn.Module, s: Setting, meta_optimizer: Callable = torch.optim.Adam,
                 meta_lr: float = 1e-3, *, warp: Callable[[nn.Module], nn.Module]) -> None:
        self.s = s
        self.net = warp(copy.deepcopy(net))
        self.theta0 = dict(self.net.named_adapt_parameters())
        self.phi = list(self.net.warp_parameters())
        self.meta_opt = meta_optimizer(list(self.theta0.values()) + self.phi, lr=meta_lr)

    def _loss(self, theta: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(functional_call(self.net, theta, (x,), strict=False), y)

    def _step(self, theta: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        grads = torch.autograd.grad(self._loss(theta, batch), list(theta.values()), create_graph=True)
        return {k: p - self.s.lr * g for (k, p), g in zip(theta.items(), grads)}

    def meta_step(self, tasks: list[Episode]) -> None:
        self.meta_opt.zero_grad()
        points = len(tasks) * self.s.steps
        phi_grad = [torch.zeros_like(q) for q in self.phi]
        for support, query in tasks:
            theta = dict(self.theta0)
            for _ in range(self.s.steps):
                fixed = {k: p.detach().requires_grad_(True) for k, p in theta.items()}
                loss = self._loss(self._step(fixed, support), query) / points
                for acc, part in zip(phi_grad, torch.autograd.grad(loss, self.phi)):
                    acc.add_(part)
                theta = self._step(theta, support)
            (self._loss(theta, query) / len(tasks)).backward(inputs=list(self.theta0.values()))
        for q, g in zip(self.phi, phi_grad):
            q.grad = g
        self.meta_opt.step()

    def learned(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.net.named_parameters()}


PEERS: dict[str, type[Contender]] = {"torch": TorchMAML, "torch-add": TorchAddMAML, "higher": HigherMAML,
                                     "torchopt": TorchoptMAML, "learn2learn": Learn2learnMAML}
HAND_WRITTEN = ("torch", "torch-add")  # written here, not peer libraries


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The peers among ``names`` that import here, and why the others do not."""
    ok, missing = [], {}
    for name in names:
        try:
            if name == "learn2learn":
                learn2learn_maml()
            elif name not in HAND_WRITTEN:
                importlib.import_module(name)
            ok.append(name)
        except Exception as e:  # an ImportError, or a peer broken against this torch
            missing[name] = f"{type(e).__name__}: {e}"
    return ok, missing


def meta_gradient_gap(contenders: dict[str, Callable[..., Contender]], s: Setting, seed: int = 0,
                      reference: Callable[..., Contender] = WarpoptMAML,
                      net: Optional[nn.Module] = None) -> dict[str, float]:
    """max |p' − p'_reference| over the learned parameters after one float64 meta-step with
    SGD(lr=1) (p' = p − meta-gradient), per contender (default net: ``fewshot_net(s)``).

    The extra entry "(|meta-gradient|, max)" is how far the reference moved (the scale of the gaps).
    """
    torch.manual_seed(seed)
    net = (fewshot_net(s) if net is None else copy.deepcopy(net)).to(torch.float64)
    tasks = episodes(s, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = reference(net, s, torch.optim.SGD, 1.0)
    before = ref.learned()
    before = {k: v.clone() for k, v in before.items()}
    ref.meta_step(tasks)
    want = ref.learned()
    gaps = {"(|meta-gradient|, max)": max((want[k] - before[k]).abs().max().item() for k in want)}
    for name, make in contenders.items():
        c = make(net, s, torch.optim.SGD, 1.0)
        c.meta_step(tasks)
        got = c.learned()
        if set(got) != set(want):
            raise ValueError(f"{name} learns {sorted(set(got) ^ set(want))} differently from the reference")
        gaps[name] = max((got[k] - want[k]).abs().max().item() for k in want)
    return gaps
