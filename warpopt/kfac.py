"""K-FAC: Kronecker-factored approximate natural gradient as a ``torch.optim`` optimizer.

The natural-gradient baseline of WarpGrad's Appendix G (Table 4) and Table 2's KFAC‡ column
(Martens & Grosse, 2015, "Optimizing neural networks with Kronecker-factored approximate
curvature"; Grosse & Martens, 2016, "A Kronecker-factored approximate Fisher matrix for
convolution layers").

    opt = warpopt.KFAC(model, lr=1.0, damping=1e-2, fisher="categorical")
    for x, y in loader:                      # the usual loop: nothing else changes
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

For every ``nn.Linear`` and ``nn.Conv2d`` with trainable weights, the Fisher block of its
parameters ``W̄ = [W, b]`` (``out x in'``; a conv weight is flattened to ``out x in·kh·kw``) is
approximated by ``F ≈ G ⊗ A`` (row-major ``vec(W̄)``, per-example gradients ``g āᵀ``) with

    A = 1/N Σ_n Σ_t ā_{n,t} ā_{n,t}ᵀ        ā = [a, 1]: the layer's input (conv: patch) at location t
    G = 1/(N|T|) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ   g: derivative of example n's loss w.r.t. the layer's output

(|T| = 1 for linear layers; Grosse & Martens 2016, Eq. 27-28 with spatially uncorrelated
derivatives). The update of a layer is ``(G ⊗ A + λI)⁻¹ vec(∇W̄)``, computed from the
eigendecompositions ``A = Q_A D_A Q_Aᵀ``, ``G = Q_G D_G Q_Gᵀ``:
``Q_G [(Q_Gᵀ V Q_A) / (d_G d_Aᵀ + λ)] Q_Aᵀ`` with ``V = ∇W̄`` — exact Tikhonov damping of the
Kronecker-factored matrix, not the factored approximation of Martens & Grosse §6.3.
Parameters outside these layers (BatchNorm, other modules) take plain gradient steps.

``fisher`` chooses where ``g`` comes from:
  * ``"empirical"``: the backward pass of *your* loss (the empirical Fisher; any loss).
  * ``"categorical"`` / ``"gaussian"``: the true Fisher of the model's predictive
    distribution (Martens & Grosse §5): after every forward pass that collects statistics,
    one target per example is sampled from softmax(logits) (or N(output, I)) and the sampled
    loss is backpropagated to the layer outputs only (``torch.autograd.grad``; ``.grad`` is
    untouched). One extra backward pass per statistics update; the model's output must be
    logits (or the Gaussian mean) of shape ``(N, C)``.

Statistics are collected on the forward/backward passes that follow every
``factor_interval``-th step (training mode, grad enabled) and averaged over time with weight
``min(1 − 1/k, factor_decay)`` on the old value at the k-th collection (Martens & Grosse §5: a
plain mean over the first ones, then an exponential average); the eigendecompositions are
refreshed every ``inverse_interval`` steps. Losses are assumed to average over the batch
(``batch_averaged=False`` for sums).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KFAC"]

FISHER_TYPES = ("empirical", "categorical", "gaussian")


def _supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.requires_grad


def _check_conv(name: str, module: nn.Conv2d) -> None:
    problems = []
    if module.groups != 1:
        problems.append(f"groups={module.groups}")
    if isinstance(module.padding, str):
        problems.append(f"padding={module.padding!r}")
    if module.padding_mode != "zeros":
        problems.append(f"padding_mode={module.padding_mode!r}")
    if problems:
        raise ValueError(
            f"KFAC supports Conv2d with groups=1 and integer zero padding; {name!r} has "
            f"{', '.join(problems)}. Pass modules=[...] without it (its parameters then take "
            "plain gradient steps)."
        )


def _activations(module: nn.Module, x: Tensor) -> Tensor:
    """Layer inputs a as rows ``(N·|T|, in)`` (conv: the patch at every output location t)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )  # (N, in·kh·kw, |T|)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _input_factor(module: nn.Module, a: Tensor, n: int) -> Tensor:
    """A = 1/N Σ ā āᵀ with ā = [a, 1] (bias), assembled blockwise instead of concatenating ones."""
    aa = a.t() @ a
    if module.bias is None:
        return aa / n
    s = a.sum(0, keepdim=True)
    count = a.new_full((1, 1), float(a.shape[0]))
    return torch.cat([torch.cat([aa, s.t()], 1), torch.cat([s, count], 1)], 0) / n


def _output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Output derivatives as rows ``(N·|T|, out)``."""
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


class KFAC(torch.optim.Optimizer):
    """K-FAC for ``nn.Linear`` and ``nn.Conv2d`` layers (Martens & Grosse 2015; Grosse & Martens 2016).

    Args:
        model: the model whose trainable parameters are optimised; hooks are registered on
            its Linear/Conv2d layers (``remove_hooks()`` takes them off).
        lr: learning rate of the preconditioned step.
        damping: λ, added to the Kronecker-factored Fisher: the step is ``(G ⊗ A + λI)⁻¹ ∇``.
        momentum: heavy-ball momentum on the final update (as ``torch.optim.SGD``).
        weight_decay: L2 term added to the gradient before preconditioning.
        factor_decay: weight of the old factors in their running average (after the first
            ``1 / (1 - factor_decay)`` collections, which are averaged plainly).
        factor_interval: collect Kronecker-factor statistics every this many steps (T_cov).
        inverse_interval: recompute the eigendecompositions every this many steps (T_inv).
        fisher: ``"empirical"``, ``"categorical"`` or ``"gaussian"`` (see the module docstring).
        kl_clip: if set, scale the layer updates by ``min(1, sqrt(kl_clip / (lr² Σ vᵀ∇)))``
            (Ba, Grosse & Martens 2017), bounding the step's KL change.
        modules: the layers to precondition (default: every Linear/Conv2d with a trainable weight).
        batch_averaged: the loss averages over the batch (True) or sums (False).
        generator: for the sampled targets of the true Fisher.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        *,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_interval: int = 1,
        inverse_interval: int = 10,
        fisher: str = "empirical",
        kl_clip: float | None = None,
        modules: Iterable[nn.Module] | None = None,
        batch_averaged: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if lr <= 0 or damping < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"KFAC needs lr > 0 and damping, momentum, weight_decay >= 0; got lr={lr}, "
                f"damping={damping}, momentum={momentum}, weight_decay={weight_decay}"
            )
        if not 0.0 <= factor_decay < 1.0:
            raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay}")
        if (
            int(factor_interval) != factor_interval
            or factor_interval < 1
            or int(inverse_interval) != inverse_interval
            or inverse_interval < 1
        ):
            raise ValueError(
                "factor_interval and inverse_interval must be positive integers, got "
                f"{factor_interval} and {inverse_interval}"
            )
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if kl_clip is not None and kl_clip <= 0:
            raise ValueError(f"kl_clip must be positive or None, got {kl_clip}")
        names = {m: n for n, m in model.named_modules()}
        layers = [m for m in model.modules() if _supported(m)] if modules is None else list(modules)
        for m in layers:
            if m not in names:
                raise ValueError(f"modules: {type(m).__name__} is not a submodule of the model")
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise ValueError(
                    f"modules: KFAC supports nn.Linear and nn.Conv2d, got {type(m).__name__} ({names[m]!r})"
                )
            if isinstance(m, nn.Conv2d):
                _check_conv(names[m], m)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("KFAC: the model has no trainable parameters")
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            factor_decay=factor_decay,
            factor_interval=int(factor_interval),
            inverse_interval=int(inverse_interval),
            kl_clip=kl_clip,
            step=0,
        )
        super().__init__(params, defaults)
        self.fisher, self.batch_averaged, self.generator = fisher, batch_averaged, generator
        self.layers = layers
        self._fresh: dict[nn.Module, dict[str, Tensor]] = {}  # statistics of the current step
        self._outputs: dict[nn.Module, Tensor] = {}  # layer outputs awaiting a sampled backward
        # Hooks are closures, not bound methods: ``copy.deepcopy(model)`` then shares them instead of
        # deep-copying this optimizer, and they ignore modules that are not this optimizer's.
        self._layer_ids = {id(m) for m in layers}
        self._model_id = id(model)
        self._handles = [
            m.register_forward_hook(lambda mod, i, o: self._forward_hook(mod, i, o), prepend=True) for m in layers
        ]
        if fisher != "empirical":
            self._handles.append(model.register_forward_hook(lambda mod, i, o: self._sample_hook(mod, i, o)))

    # ------------------------------------------------------------------ statistics
    def _collecting(self, module: nn.Module) -> bool:
        g = self.param_groups[0]
        return module.training and torch.is_grad_enabled() and g["step"] % g["factor_interval"] == 0

    def _forward_hook(self, module: nn.Module, inputs, output: Tensor) -> None:
        if id(module) not in self._layer_ids or not self._collecting(module) or not output.requires_grad:
            return
        x = inputs[0].detach()
        a = _activations(module, x).to(module.weight.dtype)
        n = x.shape[0]
        self._fresh[module] = {"A": _input_factor(module, a, n), "n": n}
        if self.fisher == "empirical":
            output.register_hook(lambda g, m=module: self._record_g(m, g))
        else:
            self._outputs[module] = output

    def _record_g(self, module: nn.Module, grad: Tensor) -> None:
        stats = self._fresh.get(module)
        if stats is None:
            return
        n = stats["n"]
        g = _output_rows(module, grad.detach()).to(module.weight.dtype)
        if self.batch_averaged:
            g = g * n
        positions = g.shape[0] // n  # |T|
        stats["G"] = g.t() @ g / (n * positions)

    def _sample_hook(self, model: nn.Module, inputs, output: Tensor) -> None:
        """True Fisher: backpropagate a loss on targets sampled from the model's prediction."""
        if id(model) != self._model_id:
            return
        outputs, self._outputs = self._outputs, {}
        if not outputs or not torch.is_tensor(output) or not output.requires_grad:
            return
        if output.dim() != 2:
            raise ValueError(
                f"KFAC(fisher={self.fisher!r}) needs a model output of shape (N, C), got "
                f"{tuple(output.shape)}; use fisher='empirical' for other outputs"
            )
        with torch.no_grad():
            if self.fisher == "categorical":
                probs = torch.softmax(output.detach().double(), 1)
                y = torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(1).to(output.device)
            else:
                noise = torch.randn(output.shape, generator=self.generator, dtype=output.dtype)
                y = output.detach() + noise.to(output.device)
        loss = F.cross_entropy(output, y) if self.fisher == "categorical" else 0.5 * (output - y).pow(2).sum(1).mean()
        mods = list(outputs)
        grads = torch.autograd.grad(loss, [outputs[m] for m in mods], retain_graph=True, allow_unused=True)
        for m, g in zip(mods, grads):
            if g is not None:
                self._record_g(m, g)

    # ------------------------------------------------------------------ step
    def _update_factors(self, module: nn.Module, group: dict) -> None:
        fresh = self._fresh.get(module)
        if fresh is None or "G" not in fresh:
            return
        st = self.state[module.weight]
        k = st["collections"] = st.get("collections", 0) + 1
        # Martens & Grosse §5: ε = min(1 − 1/k, decay), a plain mean over the first collections
        d = min(1.0 - 1.0 / k, group["factor_decay"])
        if k == 1:
            st["A"], st["G"] = fresh["A"], fresh["G"]
        else:
            st["A"] = d * st["A"] + (1 - d) * fresh["A"]
            st["G"] = d * st["G"] + (1 - d) * fresh["G"]

    @staticmethod
    def _eig(m: Tensor) -> tuple[Tensor, Tensor]:
        d, q = torch.linalg.eigh(m)
        return d.clamp_min(0.0), q

    def _grad_matrix(self, module: nn.Module, group: dict) -> Tensor:
        w, b = module.weight, module.bias
        gw = w.grad.reshape(w.shape[0], -1)
        if group["weight_decay"]:
            gw = gw + group["weight_decay"] * w.detach().reshape(w.shape[0], -1)
        if b is None:
            return gw
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        if group["weight_decay"]:
            gb = gb + group["weight_decay"] * b.detach()
        return torch.cat([gw, gb[:, None]], 1)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One preconditioned step (``closure`` re-evaluates the loss, as in ``torch.optim``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, damping, t = group["lr"], group["damping"], group["step"]
        updates: dict[Tensor, Tensor] = {}
        natural = []  # (module, update matrix V', gradient matrix V)
        for m in self.layers:
            if m.weight.grad is None:
                continue
            if t % group["factor_interval"] == 0:
                self._update_factors(m, group)
            st = self.state[m.weight]
            if "A" not in st:  # no statistics yet (the layer was not used while collecting)
                continue
            if t % group["inverse_interval"] == 0 or "QA" not in st:
                st["dA"], st["QA"] = self._eig(st["A"])
                st["dG"], st["QG"] = self._eig(st["G"])
            v = self._grad_matrix(m, group)
            u = st["QG"].t() @ v @ st["QA"]
            u = u / (st["dG"][:, None] * st["dA"][None, :] + damping)
            natural.append((m, st["QG"] @ u @ st["QA"].t(), v))
        self._fresh.clear()
        self._outputs.clear()
        scale = 1.0
        if group["kl_clip"] is not None and natural:
            vg = sum(float((u * v).sum()) for _, u, v in natural) * lr**2
            scale = min(1.0, math.sqrt(group["kl_clip"] / vg)) if vg > 0 else 1.0
        for m, u, _ in natural:
            w = m.weight
            updates[w] = scale * u[:, : w[0].numel()].reshape(w.shape)
            if m.bias is not None:
                updates[m.bias] = scale * u[:, -1]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = updates.get(p)
            if d is None:  # outside the preconditioned layers: the plain (decayed) gradient
                d = p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad
            if group["momentum"]:
                st = self.state[p]
                buf = st.get("momentum_buffer")
                # not in place: a state_dict loaded into another optimizer in this process shares tensors
                st["momentum_buffer"] = d.clone() if buf is None else buf * group["momentum"] + d
                d = st["momentum_buffer"]
            p.add_(d, alpha=-lr)
        group["step"] = t + 1
        return loss

    def remove_hooks(self) -> None:
        """Take the optimizer's hooks off the model (it cannot collect statistics afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []
