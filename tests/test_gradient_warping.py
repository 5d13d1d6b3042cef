"""Gradient warping, checked numerically in float64 (Sec. 2.2-2.3, Eq. 2-5).

Task learner ``h = W3 o omega2 o W2 o omega1 o W1`` with linear warps
``omega_i(z) = T_i z (+ b_i)``. The explicit warp ``Omega`` reparameterises each warped
layer by its effective weights, ``omega_i(h_i(x; W_i)) = h_i(x; T_i W_i) (+ b_i)``, so
``gamma = Omega(theta) = (T1 W1, T2 W2, W3)`` and, with row-major ``vec``,
``DOmega = blockdiag(T1 (x) I, T2 (x) I, I)``. Then

* Eq. 3: ``grad_theta (L o Omega) = DOmega^T grad_gamma L``;
* Eq. 4: ``Delta gamma = DOmega Delta theta = G^{-1} grad_gamma L`` with
  ``G^{-1} = DOmega DOmega^T = blockdiag(T1 T1^T (x) I, T2 T2^T (x) I, I)``;
* Eq. 5: for linear warps ``(L o Omega)(theta - a Delta theta) = L(gamma - a Delta gamma)``
  holds exactly, not just to first order;
* Eq. 2: ``dL/dW1 = E[grad l^T W3 T2 W2 T1 D_W1 h1]``.
"""

import functools

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import functional_call

from warpopt.layers import (
    ConvBNWarp,
    ConvWarp,
    LinearWarp,
    ResidualWarp,
    ScaleWarp,
    TwoLayerResidualWarp,
    default_warp_layer,
)
from warpopt.warping import warp

DIMS = (3, 4, 5, 2)  # d0 -> d1 -> d2 -> d3
N = 6



def task_learner(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(DIMS[:-1], DIMS[1:])]).double()


def data(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N, DIMS[0], generator=gen, dtype=torch.float64),
            torch.randn(N, DIMS[-1], generator=gen, dtype=torch.float64))  # fmt: skip


def mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


def warped_learner(layer, perturb: bool):
    model = warp(task_learner(), layer=layer)
    assert list(model.warp_layers()) == ["0.warp", "1.warp"]
    assert [n for n, _ in model.named_adapt_parameters()] == ["0.weight", "1.weight", "2.weight"]
    if perturb:  # a non-identity warp
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.warp_parameters():
                p.add_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    warps = [model[0].warp, model[1].warp]
    Ts = [w.weight.detach() for w in warps]
    no_bias = [torch.zeros(w.weight.shape[0], dtype=torch.float64) for w in warps]
    bs = [w.bias.detach() if w.bias is not None else zero for w, zero in zip(warps, no_bias)]
    return model, Ts, bs


def split(vector, shapes):
    sizes = [torch.Size(s).numel() for s in shapes]
    return [v.reshape(s) for v, s in zip(vector.split(sizes), shapes)]


def explicit_warp(Ts):
    """Omega: vec(theta) -> vec(gamma), the effective weights of the warped layers."""
    shapes = [(b, a) for a, b in zip(DIMS[:-1], DIMS[1:])]

    def omega(theta_vec):
        W1, W2, W3 = split(theta_vec, shapes)
        return torch.cat([(Ts[0] @ W1).reshape(-1), (Ts[1] @ W2).reshape(-1), W3.reshape(-1)])

    return omega, shapes


def native_loss(gamma_vec, shapes, bs, x, y):
    """L(gamma): the unwarped learner with weights gamma (warp biases are constants)."""
    G1, G2, G3 = split(gamma_vec, shapes)
    return mse(((x @ G1.T + bs[0]) @ G2.T + bs[1]) @ G3.T, y)


def theta_grad(model, x, y):
    adapt = list(model.adapt_parameters())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(mse(model(x), y), adapt)])


LINEAR_WARPS = {"LinearWarp": LinearWarp, "ConvWarp-features": ConvWarp}


@pytest.mark.parametrize("perturb", [False, True], ids=["identity", "non-identity"])
@pytest.mark.parametrize("layer", LINEAR_WARPS.values(), ids=LINEAR_WARPS.keys())
def test_gradient_warping_is_preconditioning(layer, perturb):
    model, Ts, bs = warped_learner(layer, perturb)
    x, y = data()
    theta = torch.cat([p.detach().reshape(-1) for p in model.adapt_parameters()])
    omega, shapes = explicit_warp(Ts)
    gamma = omega(theta)

    # the explicit warp reproduces the warped model: omega(h(x; W)) = h(x; Omega(W))
    torch.testing.assert_close(native_loss(gamma, shapes, bs, x, y), mse(model(x), y), rtol=1e-12, atol=1e-12)

    D = jacobian(omega, theta)  # DOmega
    eye = [torch.eye(d, dtype=torch.float64) for d in DIMS]
    identity_block = torch.eye(DIMS[2] * DIMS[3], dtype=torch.float64)  # W3 is not warped
    D_by_hand = torch.block_diag(torch.kron(Ts[0], eye[0]), torch.kron(Ts[1], eye[1]), identity_block)
    torch.testing.assert_close(D, D_by_hand, rtol=0, atol=1e-12)

    grad_gamma = torch.autograd.grad(native_loss(gamma.requires_grad_(), shapes, bs, x, y), gamma)[0]
    gamma = gamma.detach()
    delta_theta = theta_grad(model, x, y)
    torch.testing.assert_close(delta_theta, D.T @ grad_gamma, rtol=1e-10, atol=1e-12)  # Eq. 3

    G_inv = torch.block_diag(
        torch.kron(Ts[0] @ Ts[0].T, eye[0]), torch.kron(Ts[1] @ Ts[1].T, eye[1]), identity_block
    )
    torch.testing.assert_close(D @ D.T, G_inv, rtol=0, atol=1e-12)
    delta_gamma = D @ delta_theta
    torch.testing.assert_close(delta_gamma, G_inv @ grad_gamma, rtol=1e-10, atol=1e-12)  # Eq. 4
    assert torch.linalg.eigvalsh(G_inv).min() > 0  # a valid Riemann metric (non-degenerate warp)

    # Eq. 5, exact for linear warps: a step in P is a preconditioned step in W
    alpha = 0.3
    names = [n for n, _ in model.named_adapt_parameters()]
    stepped = dict(zip(names, split(theta - alpha * delta_theta, shapes)))
    warped_after = mse(functional_call(model, stepped, (x,)), y)
    native_after = native_loss(gamma - alpha * delta_gamma, shapes, bs, x, y)
    torch.testing.assert_close(warped_after, native_after, rtol=1e-12, atol=1e-12)

    # Eq. 2 for W1: the backward pass multiplies the input Jacobians of all later layers
    W = [p.detach() for p in model.adapt_parameters()]
    out = model(x).detach()
    grad_out = (out - y) / N  # d loss / d output, per sample
    chain = W[2] @ Ts[1] @ W[1] @ Ts[0]  # D_x h3 D_x omega2 D_x h2 D_x omega1
    D_theta_h1 = [torch.kron(eye[1], x_n[None, :]) for x_n in x]  # d(W1 x_n)/d vec(W1)
    eq2 = sum(g_n @ chain @ J_n for g_n, J_n in zip(grad_out, D_theta_h1))
    torch.testing.assert_close(delta_theta[: DIMS[0] * DIMS[1]], eq2, rtol=1e-10, atol=1e-12)

    # compare with plain (unwarped) gradient descent at the same theta
    plain = task_learner()
    plain_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mse(plain(x), y), list(plain.parameters()))])
    if perturb:
        assert not torch.allclose(delta_theta, plain_grad, atol=1e-6)
        assert not torch.allclose(delta_gamma, grad_gamma, atol=1e-6)
    else:
        torch.testing.assert_close(delta_theta, plain_grad, rtol=0, atol=0)
        torch.testing.assert_close(G_inv, torch.eye(len(theta), dtype=torch.float64), rtol=0, atol=0)


def conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 9, 3), nn.Tanh(), nn.Linear(3, 2),
    ).double()  # fmt: skip


ZOO_TRAIN = {
    "default": default_warp_layer,
    "conv1x1": functools.partial(ConvWarp, kernel_size=1),
    "linear": LinearWarp,
    "scale": ScaleWarp,
    "residual": ResidualWarp,
    "two-layer-ta": functools.partial(TwoLayerResidualWarp, task_film=True),
}


CASES = [(name, train) for name in ZOO_TRAIN for train in (True, False)] + [("conv-bn", False)]


@pytest.mark.parametrize("name, train", CASES)
def test_identity_warp_leaves_task_gradients_unchanged(name, train):
    """Right after warp(), task gradients equal the unwarped model's (Eq. 2 with omega = id)."""
    layer = ZOO_TRAIN.get(name, ConvBNWarp)
    # ResidualWarp is the identity on non-negative inputs only: skip the Tanh-hosted Linear
    where = nn.Conv2d if name == "residual" else None
    reference = conv_net().train(train)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    model = warp(conv_net(), where=where, layer=layer).train(train)
    names = [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in model.named_adapt_parameters() if n in names] == names
    loss_ref = reference(x).pow(2).sum()
    loss = model(x).pow(2).sum()
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    grads_ref = torch.autograd.grad(loss_ref, list(reference.parameters()))
    adapt = dict(model.named_adapt_parameters())
    grads = torch.autograd.grad(loss, [adapt[n] for n in names])
    for n, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12, msg=n)
