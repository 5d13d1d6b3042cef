"""warpopt.KFAC against explicitly built Kronecker-factored Fishers (float64) and on quadratics."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import warpopt

DT = torch.float64


def _step(model, opt, loss_fn):
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn(model).backward()
    opt.step()
    return [(b - p.detach()) / opt.param_groups[0]["lr"] for b, p in zip(before, model.parameters())]


def _flat(w, b):
    """Row-major vec of [W, b] (conv weights flattened to out x in·kh·kw)."""
    return torch.cat([w.reshape(w.shape[0], -1), b[:, None]], 1).reshape(-1)


def _solve(G, A, grad_wb, damping):
    """(G ⊗ A + λI)⁻¹ vec(∇[W, b]), built explicitly."""
    Fk = torch.kron(G, A)
    return torch.linalg.solve(Fk + damping * torch.eye(len(Fk), dtype=DT), grad_wb)


def _mlp(sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(DT)


def _per_example_linear_stats(model, x, loss_of_output):
    """Inputs ā and per-example output derivatives g of every Linear, by hand (no hooks)."""
    acts, outs, h = [], [], x
    for m in model:
        if isinstance(m, nn.Linear):
            acts.append(torch.cat([h, torch.ones(len(h), 1, dtype=DT)], 1))
            h = h @ m.weight.t() + m.bias
            h.retain_grad()
            outs.append(h)
        else:
            h = m(h)
    loss_of_output(h).backward()   # a *sum* over examples: g_n = dℓ_n/ds_n (no cross-example terms)
    return acts, [o.grad for o in outs]


def test_mlp_step_is_the_explicit_damped_kronecker_factored_natural_gradient():
    model = _mlp([3, 4, 5, 3])
    x, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2])
    ref = copy.deepcopy(model)
    acts, gs = _per_example_linear_stats(ref, x, lambda out: F.cross_entropy(out, y, reduction="sum"))
    lam = 0.05
    opt = warpopt.KFAC(model, lr=0.5, damping=lam, fisher="empirical")
    moved = _step(model, opt, lambda m: F.cross_entropy(m(x), y))
    linears = [m for m in ref if isinstance(m, nn.Linear)]
    for i, (m, a, g) in enumerate(zip(linears, acts, gs)):
        A, G = a.t() @ a / len(x), g.t() @ g / len(x)
        grad_wb = (g.t() @ a / len(x)).reshape(-1)            # ∇ of the mean loss: mean_n g_n ā_nᵀ
        expected = _solve(G, A, grad_wb, lam)
        got = _flat(moved[2 * i], moved[2 * i + 1])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4), lam=st.floats(1e-3, 1.0), seed=st.integers(0, 99))
def test_one_example_kfac_is_the_exact_damped_fisher_of_each_layer(sizes, lam, seed):
    """For one example the per-layer gradient is g āᵀ, so G ⊗ A *is* the layer's empirical
    Fisher block: the step must equal (F + λI)⁻¹∇ with F built from torch.func gradients."""
    model = _mlp(sizes, seed)
    x = torch.randn(1, sizes[0], dtype=DT)
    target = torch.randn(1, sizes[-1], dtype=DT)
    loss = lambda out: 0.5 * (out - target).pow(2).sum()  # noqa: E731
    params = dict(model.named_parameters())
    grads = grad(lambda p: loss(functional_call(model, p, (x,))))(params)
    opt = warpopt.KFAC(model, lr=1.0, damping=lam)
    moved = dict(zip(params, _step(model, opt, lambda m: loss(m(x)))))
    for name, m in model.named_children():
        if not isinstance(m, nn.Linear):
            continue
        v = _flat(grads[f"{name}.weight"], grads[f"{name}.bias"])
        fisher = torch.outer(v, v)   # exact (one-example) Fisher block of [W, b]
        expected = torch.linalg.solve(fisher + lam * torch.eye(len(v), dtype=DT), v)
        torch.testing.assert_close(_flat(moved[f"{name}.weight"], moved[f"{name}.bias"]), expected,
                                   rtol=1e-8, atol=1e-10)


def _patches_by_hand(x, k, pad):
    """ā at every output location (stride 1), with loops over locations: (N, |T|, C·k·k + 1)."""
    xp = F.pad(x, (pad, pad, pad, pad))
    n, c, h, w = x.shape
    rows = []
    for i in range(h + 2 * pad - k + 1):
        for j in range(w + 2 * pad - k + 1):
            rows.append(xp[:, :, i:i + k, j:j + k].reshape(n, -1))
    p = torch.stack(rows, 1)
    return torch.cat([p, torch.ones(n, p.shape[1], 1, dtype=DT)], 2)


def test_conv_step_is_the_explicit_kfc_natural_gradient():
    """Grosse & Martens 2016: A = E[Σ_t ā_t ā_tᵀ], G = E[Σ_t g_t g_tᵀ]/|T| (here built by hand)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DT)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).to(DT)
    x, y = torch.randn(5, 2, 4, 4, dtype=DT), torch.tensor([0, 1, 2, 3, 0])
    ref = copy.deepcopy(model)
    s = ref[0](x)
    s.retain_grad()
    F.cross_entropy(ref[3](ref[2](ref[1](s))), y, reduction="sum").backward()
    g = s.grad.permute(0, 2, 3, 1).reshape(5, 16, 3)       # (N, |T|, out): per-example, per-location
    a = _patches_by_hand(x, 3, 1)                            # (N, |T|, 19)
    # the factorisation's ingredients reproduce the true gradient: ∇W̄ = mean_n Σ_t g āᵀ
    grad_wb = torch.einsum("nto,nti->oi", g, a) / 5
    torch.testing.assert_close(grad_wb, torch.cat([ref[0].weight.grad.reshape(3, -1),
                                                   ref[0].bias.grad[:, None]], 1) / 5)
    A = torch.einsum("nti,ntj->ij", a, a) / 5
    G = torch.einsum("nto,ntp->op", g, g) / (5 * 16)
    lam = 0.01
    opt = warpopt.KFAC(model, lr=0.3, damping=lam, inverse_interval=1)
    moved = _step(model, opt, lambda m: F.cross_entropy(m(x), y))
    torch.testing.assert_close(_flat(moved[0], moved[1]), _solve(G, A, grad_wb.reshape(-1), lam),
                               rtol=1e-9, atol=1e-12)


def test_true_fisher_uses_targets_sampled_from_the_model():
    model = _mlp([3, 4, 3])
    x, y = torch.randn(7, 3, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(ref(x), 1), 1, generator=torch.Generator().manual_seed(3))[:, 0]
    acts, gs = _per_example_linear_stats(ref, x, lambda out: F.cross_entropy(out, sampled, reduction="sum"))
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()   # the step itself follows the true loss's gradient
    opt = warpopt.KFAC(model, lr=1.0, damping=0.1, fisher="categorical", generator=torch.Generator().manual_seed(3))
    moved = _step(model, opt, lambda m: F.cross_entropy(m(x), y))
    for i, (m, a, g) in enumerate(zip([m for m in ref if isinstance(m, nn.Linear)], acts, gs)):
        A, G = a.t() @ a / 7, g.t() @ g / 7
        expected = _solve(G, A, _flat(m.weight.grad, m.bias.grad), 0.1)
        torch.testing.assert_close(_flat(moved[2 * i], moved[2 * i + 1]), expected, rtol=1e-9, atol=1e-12)
    # the sampled backward leaves .grad alone: the gradient is the true loss's
    ref2 = copy.deepcopy(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(ref2(x), y).backward()
    for p, q in zip(model.parameters(), ref2.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def _least_squares(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT) * torch.tensor([1.0, 3.0, 0.2], dtype=DT)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT) + 0.3 + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)
    xb = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
    return x, y, torch.linalg.lstsq(xb, y).solution[:, 0]


def test_quadratic_empirical_fisher_step_is_newton_scaled_by_the_residual_variance():
    """Least squares with one output: A = E[ā āᵀ] is the Hessian and G = E[r²] a scalar, so the
    undamped step is the Newton step divided by E[r²]; with lr = E[r²] it lands on the minimiser."""
    x, y, solution = _least_squares()
    model = nn.Linear(3, 1).to(DT)
    with torch.no_grad():
        residual_var = (model(x) - y).pow(2).mean().item()
    opt = warpopt.KFAC(model, lr=residual_var, damping=0.0)
    _step(model, opt, lambda m: 0.5 * (m(x) - y).pow(2).mean())
    torch.testing.assert_close(torch.cat([model.weight[0], model.bias]).detach(), solution, rtol=1e-9, atol=1e-10)


def test_quadratic_gaussian_fisher_step_is_the_newton_step():
    """With a unit-variance Gaussian likelihood the Fisher of a linear model is E[ā āᵀ] ⊗ I, the
    Hessian of the squared loss: one natural-gradient step at lr 1 solves least squares (up to
    the Monte-Carlo error of G ≈ I, ~sqrt(2/N))."""
    x, y, solution = _least_squares(n=20000)
    model = nn.Linear(3, 1).to(DT)
    plain = copy.deepcopy(model)
    start = torch.cat([model.weight[0], model.bias]).detach().clone()
    opt = warpopt.KFAC(model, lr=1.0, damping=0.0, fisher="gaussian", generator=torch.Generator().manual_seed(0))
    _step(model, opt, lambda m: 0.5 * (m(x) - y).pow(2).mean())
    end = torch.cat([model.weight[0], model.bias]).detach()
    assert (end - solution).norm() < 0.05 * (start - solution).norm()
    # a plain gradient step (largest stable lr ~ 2 / λ_max(A) ≈ 0.2) does not come close
    g = torch.autograd.grad(0.5 * (plain(x) - y).pow(2).mean(), list(plain.parameters()))
    assert (start - 0.1 * torch.cat([g[0][0], g[1]]) - solution).norm() > 0.4 * (start - solution).norm()


def test_intervals_reuse_the_inverse_and_collect_factors_on_schedule():
    torch.manual_seed(0)
    model = _mlp([3, 4, 2])
    opt = warpopt.KFAC(model, lr=0.1, damping=0.1, factor_interval=2, inverse_interval=3, factor_decay=0.5)
    w = model[0].weight
    seen = []
    for t in range(6):
        x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        seen.append({k: opt.state[w][k].clone() for k in ("A", "QA")})
    changed = lambda k, i: not torch.equal(seen[i][k], seen[i - 1][k])  # noqa: E731
    assert [changed("A", t) for t in range(1, 6)] == [False, True, False, True, False]   # steps 2, 4
    assert opt.state[w]["collections"] == 3
    assert [changed("QA", t) for t in range(1, 6)] == [False, False, True, False, False]  # step 3
    assert opt.param_groups[0]["step"] == 6


def test_other_parameters_take_sgd_steps_with_momentum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    twin = copy.deepcopy(net)
    kfac = warpopt.KFAC(net, lr=0.1, momentum=0.9, weight_decay=0.01)
    sgd = torch.optim.SGD(twin[1].parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
        for m, o in ((net, kfac), (twin, sgd)):
            m.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
        with torch.no_grad():  # the twin's linear layers follow KFAC's, so BatchNorm sees the same gradients
            for i in (0, 3):
                for p, q in zip(net[i].parameters(), twin[i].parameters()):
                    q.copy_(p)
    for p, q in zip(net[1].parameters(), twin[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_kl_clip_bounds_the_step():
    model = _mlp([3, 4, 2])
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    free, clipped = copy.deepcopy(model), copy.deepcopy(model)
    loss = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    u_free = _step(free, warpopt.KFAC(free, lr=1.0, damping=1e-3), loss)
    u_clip = _step(clipped, warpopt.KFAC(clipped, lr=1.0, damping=1e-3, kl_clip=1e-4), loss)
    g = torch.autograd.grad(loss(model), list(model.parameters()))
    vg = sum((u * gi).sum() for u, gi in zip(u_free, g))
    nu = min(1.0, (1e-4 / vg).sqrt().item())
    assert nu < 1
    for a, b in zip(u_free, u_clip):
        torch.testing.assert_close(b, nu * a)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = _mlp([3, 4, 2])
    opt = warpopt.KFAC(model, lr=0.1, momentum=0.5, inverse_interval=2)
    batches = [(torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)) for _ in range(4)]
    for x, y in batches[:2]:
        _step(model, opt, lambda m: F.mse_loss(m(x), y))
    twin = copy.deepcopy(model)
    opt2 = warpopt.KFAC(twin, lr=0.1, momentum=0.5, inverse_interval=2)
    opt2.load_state_dict(opt.state_dict())
    for x, y in batches[2:]:
        _step(model, opt, lambda m: F.mse_loss(m(x), y))
        _step(twin, opt2, lambda m: F.mse_loss(m(x), y))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_input_raises_before_hooks_are_registered():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match="groups=2"):
        warpopt.KFAC(net)
    assert not net[0]._forward_hooks
    with pytest.raises(ValueError, match="fisher must be one of"):
        warpopt.KFAC(nn.Linear(2, 2), fisher="exact")
    with pytest.raises(ValueError, match="not a submodule"):
        warpopt.KFAC(nn.Linear(2, 2), modules=[nn.Linear(2, 2)])
    opt = warpopt.KFAC(net, modules=[])   # excluded: the conv takes plain gradient steps
    x = torch.randn(2, 4, 5, 5)
    net(x).sum().backward()
    before = net[0].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(net[0].weight, before - 0.1 * net[0].weight.grad)


def test_a_warped_models_adapt_layers_are_preconditioned_on_their_raw_outputs():
    """Warp hooks replace a module's output; KFAC's hook runs first and sees the layer's own output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DT)
    model = warpopt.warp(net, layer=warpopt.LinearWarp)
    with torch.no_grad():
        model[0].warp.weight.mul_(2.0)   # a non-identity warp
    for p in model.warp_parameters():
        p.requires_grad_(False)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    s = x @ model[0].weight.t() + model[0].bias   # raw output of the first layer
    s.retain_grad()
    out = model[1](model[0].warp(s))
    (0.5 * (out - y).pow(2).sum(1)).sum().backward()
    a = torch.cat([x, torch.ones(6, 1, dtype=DT)], 1)
    A, G = a.t() @ a / 6, s.grad.t() @ s.grad / 6
    expected = _solve(G, A, _flat(model[0].weight.grad, model[0].bias.grad) / 6, 0.1)
    model.zero_grad()
    opt = warpopt.KFAC(model, lr=1.0, damping=0.1)
    moved = _step(model, opt, lambda m: 0.5 * (m(x) - y).pow(2).sum(1).mean())
    got = dict(zip([n for n, _ in model.named_parameters()], moved))
    torch.testing.assert_close(_flat(got["0.weight"], got["0.bias"]), expected, rtol=1e-9, atol=1e-12)


def test_factors_are_a_plain_mean_first_then_an_exponential_average():
    """Martens & Grosse §5: weight min(1 − 1/k, decay) on the old factor at the k-th collection."""
    model = _mlp([3, 2])
    opt = warpopt.KFAC(model, lr=0.01, factor_decay=0.6)
    fresh = []
    for _ in range(3):
        x = torch.randn(4, 3, dtype=DT)
        a = torch.cat([x, torch.ones(4, 1, dtype=DT)], 1)
        fresh.append(a.t() @ a / 4)   # the first layer's A, by hand
        _step(model, opt, lambda m: m(x).pow(2).mean())
    expected = 0.6 * (0.5 * fresh[0] + 0.5 * fresh[1]) + 0.4 * fresh[2]   # k = 2: ε = 1/2; k = 3: ε = 0.6
    torch.testing.assert_close(opt.state[model[0].weight]["A"], expected, rtol=1e-12, atol=1e-14)
