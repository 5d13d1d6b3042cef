"""End-to-end finite-difference check of the exact meta-gradient (Eq. 7) for any warped model.

The meta-gradient is read off ``WarpGradMetaOptimizer`` as a user sees it (one task of one
step, ``online()``, a fixed θ0, plain SGD with meta_lr 1 on φ, so φ − φ' = ∇φ L), and
compared with central differences of the one-step objective written out by hand with plain
autograd: L(φ) = L_meta(θ0 − α ∇θ L_task(θ0; φ); φ), L_task on one fixed batch, L_meta on
another.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import functional_call

import warpopt


def optimizer_meta_gradient(model, batch, meta_batch, loss: Callable, lr: float) -> list[torch.Tensor]:
    """∇φ of Eq. 7 at θ0 as applied by ``meta_step()``."""
    opt = warpopt.WarpGradMetaOptimizer(model, lr=lr, algorithm=warpopt.online(), initialisation=warpopt.none(),
                                        meta_optimizer=torch.optim.SGD, meta_lr=1.0)
    before = [p.detach().clone() for p in model.warp_parameters()]
    theta0 = [p.detach().clone() for p in model.adapt_parameters()]
    with opt.task(lambda k: batch, loss, meta_data=lambda k: meta_batch):
        opt.zero_grad()
        loss(model(batch[0]), batch[1]).backward()
        opt.step()
    opt.meta_step()
    after = [p.detach().clone() for p in model.warp_parameters()]
    with torch.no_grad():  # leave the model as it was (the task stepped θ, meta_step moved φ)
        for p, b in zip(list(model.warp_parameters()) + list(model.adapt_parameters()), before + theta0):
            p.copy_(b)
    return [b - a for b, a in zip(before, after)]


def one_step_objective(model, batch, meta_batch, loss: Callable, lr: float) -> Callable[[list[torch.Tensor]], float]:
    """φ -> L_meta(θ0 − α ∇θ L_task(θ0; φ); φ), by hand (no warpopt replay machinery)."""
    phi_names = [n for n, _ in model.named_warp_parameters()]
    theta_names = [n for n, _ in model.named_adapt_parameters()]
    theta0 = [p.detach().clone() for p in model.adapt_parameters()]

    def value(phi: list[torch.Tensor]) -> float:
        theta = [t.clone().requires_grad_(True) for t in theta0]

        def at(params: list[torch.Tensor], x: Any) -> Any:
            return functional_call(model, {**dict(zip(phi_names, phi)), **dict(zip(theta_names, params))}, (x,))

        grads = torch.autograd.grad(loss(at(theta, batch[0]), batch[1]), theta)
        stepped = [t.detach() - lr * g for t, g in zip(theta, grads)]
        with torch.no_grad():
            return loss(at(stepped, meta_batch[0]), meta_batch[1]).item()

    return value


def central_differences(value: Callable[[list[torch.Tensor]], float], point: list[torch.Tensor],
                        eps: float = 1e-6) -> list[torch.Tensor]:
    """Gradient of ``value`` at ``point`` by central differences, coordinate by coordinate."""
    point = [p.detach().clone() for p in point]
    grads = []
    for tensor in point:
        grad, flat = torch.zeros_like(tensor), tensor.view(-1)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            up = value(point)
            flat[i] = original - eps
            down = value(point)
            flat[i] = original
            grad.view(-1)[i] = (up - down) / (2 * eps)
        grads.append(grad)
    return grads


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x = torch.cat([t.reshape(-1) for t in a])
    y = torch.cat([t.reshape(-1) for t in b])
    return ((x - y).norm() / y.norm()).item()


def check_exact_meta_gradient(model, batch, meta_batch, loss: Callable, lr: float = 0.3) -> float:
    """Relative error between the optimizer's meta-gradient and central differences (float64)."""
    analytic = optimizer_meta_gradient(model, batch, meta_batch, loss, lr)
    numeric = central_differences(one_step_objective(model, batch, meta_batch, loss, lr),
                                  list(model.warp_parameters()))
    assert torch.cat([g.reshape(-1) for g in numeric]).norm() > 1e-6, "a vanishing meta-gradient proves nothing"
    return relative_error(analytic, numeric)
