"""Tests for warpopt.task_optimizers: functional steps must reproduce torch.optim."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warpopt import task_optimizers as to
from warpopt.task_optimizers import (
    adam_step,
    adamw_step,
    functional_step_for,
    load_optimizer_states,
    optimizer_states,
    register_functional_step,
    rmsprop_step,
    sgd_step,
    state_keys_for,
)

DT = torch.float64
TOL = dict(atol=1e-12, rtol=1e-12)
HYP = settings(deadline=None, max_examples=15, derandomize=True)

shapes_st = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)


def _make_params(shapes, gen, dtype=DT):
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def _rand_like(p, gen):
    return torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _assert_states_close(ours, theirs, tol=TOL):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert set(a) == set(b), (set(a), set(b))
        for k in a:
            torch.testing.assert_close(a[k], b[k], **tol)


def _compare_with_torch(opt_cls, kwargs, shapes, n_steps=4, seed=0, dtype=DT, tol=TOL):
    """Step torch.optim and our functional step side by side from identical states."""
    gen = torch.Generator().manual_seed(seed)
    params = _make_params(shapes, gen, dtype)
    opt = opt_cls(params, **kwargs)
    step_fn = functional_step_for(opt)
    hypers = [opt.param_groups[0]] * len(params)
    for _ in range(n_steps):
        grads = [_rand_like(p, gen) for p in params]
        before = optimizer_states(opt, params, copy=True)
        p_before = [p.detach().clone() for p in params]
        new_p, new_s = step_fn(p_before, grads, before, hypers)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for a, b in zip(new_p, params):
            torch.testing.assert_close(a, b, **tol)
        _assert_states_close(new_s, optimizer_states(opt, params), tol)
        assert all(set(s) == set(state_keys_for(step_fn, hypers[0])) for s in new_s)


# ----------------------------------------------------------------------------- equivalence


@HYP
@given(
    shapes=shapes_st,
    lr=st.floats(1e-3, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.3]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sgd_matches_torch(shapes, lr, momentum, dampening, weight_decay, nesterov, maximize, seed):
    if nesterov:
        dampening = 0.0
        momentum = momentum or 0.9
    kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    _compare_with_torch(torch.optim.SGD, kw, shapes, seed=seed)


@HYP
@given(
    shapes=shapes_st,
    lr=st.floats(1e-3, 0.5),
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.5, 0.9999),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    decoupled=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adam_adamw_match_torch(shapes, lr, b1, b2, eps, weight_decay, amsgrad, maximize, decoupled, seed):
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    _compare_with_torch(torch.optim.Adam, dict(kw, decoupled_weight_decay=decoupled), shapes, seed=seed)
    _compare_with_torch(torch.optim.AdamW, kw, shapes, seed=seed + 1)


@HYP
@given(
    shapes=shapes_st,
    lr=st.floats(1e-3, 0.1),
    alpha=st.floats(0.5, 0.999),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    momentum=st.sampled_from([0.0, 0.9]),
    centered=st.booleans(),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rmsprop_matches_torch(shapes, lr, alpha, eps, weight_decay, momentum, centered, maximize, seed):
    kw = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
              centered=centered, maximize=maximize)
    _compare_with_torch(torch.optim.RMSprop, kw, shapes, seed=seed)


@pytest.mark.parametrize("opt_cls,kw", [
    (torch.optim.Adam, dict(lr=0.1, amsgrad=True, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=0.1)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
])
def test_complex_params_match_torch(opt_cls, kw):
    _compare_with_torch(opt_cls, kw, [(3,), (2, 2)], dtype=torch.complex128)


@pytest.mark.parametrize("flag", ["foreach", "fused", "differentiable"])
@pytest.mark.parametrize("opt_cls,kw", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=0.1, amsgrad=True, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=0.1, maximize=True)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
])
def test_implementation_flags_do_not_change_semantics(opt_cls, kw, flag):
    if flag == "fused" and opt_cls is torch.optim.RMSprop:
        pytest.skip("RMSprop has no fused implementation")
    # torch's differentiable Adam computes β^t with the float32 `step` tensor: ~1e-7 error.
    tol = dict(atol=1e-6, rtol=1e-6) if flag == "differentiable" and opt_cls is not torch.optim.SGD else TOL
    _compare_with_torch(opt_cls, dict(kw, **{flag: True}), [(3, 2), (5,)], tol=tol)


def test_float32_params_and_tensor_lr():
    gen = torch.Generator().manual_seed(3)
    params = _make_params([(5,)], gen, torch.float32)
    opt = torch.optim.Adam(params, lr=torch.tensor(0.01), amsgrad=True)
    for _ in range(3):
        g = [torch.randn(5, generator=gen)]
        new_p, new_s = adam_step([params[0].clone()], g, optimizer_states(opt, params, copy=True),
                                 opt.param_groups)
        params[0].grad = g[0]
        opt.step()
        torch.testing.assert_close(new_p[0], params[0], atol=1e-6, rtol=1e-6)
        assert new_s[0]["step"].dtype == torch.float32


def test_multiple_param_groups():
    gen = torch.Generator().manual_seed(1)
    a, b = _make_params([(3,), (2, 2)], gen)
    opt = torch.optim.SGD([{"params": [a], "momentum": 0.9}, {"params": [b], "lr": 0.5}], lr=0.1)
    hypers = [opt.param_groups[0], opt.param_groups[1]]
    for _ in range(3):
        grads = [torch.randn(3, generator=gen, dtype=DT), torch.randn(2, 2, generator=gen, dtype=DT)]
        new_p, new_s = sgd_step([a.clone(), b.clone()], grads, optimizer_states(opt, [a, b], copy=True), hypers)
        a.grad, b.grad = grads
        opt.step()
        torch.testing.assert_close(new_p[0], a, **TOL)
        torch.testing.assert_close(new_p[1], b, **TOL)
        _assert_states_close(new_s, optimizer_states(opt, [a, b]))
        assert new_s[1] == {}


# ----------------------------------------------------------------------------- fresh state


@pytest.mark.parametrize("opt_cls,kw,fn", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.5), sgd_step),
    (torch.optim.Adam, dict(lr=0.1, amsgrad=True), adam_step),
    (torch.optim.AdamW, dict(lr=0.1, weight_decay=0.3), adamw_step),
    (torch.optim.RMSprop, dict(lr=0.1, momentum=0.5, centered=True), rmsprop_step),
])
def test_fresh_state_reproduces_first_step(opt_cls, kw, fn):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, generator=gen, dtype=DT)
    g = torch.randn(4, 3, generator=gen, dtype=DT)
    opt = opt_cls([p], **kw)
    new_p, new_s = fn([p.clone()], [g], [{}], [opt.param_groups[0]])
    p.grad = g
    opt.step()
    torch.testing.assert_close(new_p[0], p, **TOL)
    _assert_states_close(new_s, optimizer_states(opt, [p]))


def test_hypers_single_mapping_broadcasts_and_length_check():
    p, g = torch.ones(2, dtype=DT), torch.ones(2, dtype=DT)
    new_p, _ = sgd_step([p, p], [g, g], [{}, {}], {"lr": 0.5})
    assert torch.equal(new_p[1], torch.full((2,), 0.5, dtype=DT))
    with pytest.raises(ValueError):
        sgd_step([p], [g, g], [{}], [{"lr": 0.1}])


# ----------------------------------------------------------------------------- differentiability


def _rand(*shape, seed=0, pos=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return (x.abs() + 0.1 if pos else x).requires_grad_()


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_gradcheck(nesterov):
    p, g, buf = _rand(3, 2, seed=0), _rand(3, 2, seed=1), _rand(3, 2, seed=2)
    lr, mu = torch.tensor(0.1, dtype=DT, requires_grad=True), torch.tensor(0.8, dtype=DT, requires_grad=True)

    def f(p, g, buf, lr, mu):
        h = {"lr": lr, "momentum": mu, "dampening": 0.0 if nesterov else 0.2,
             "weight_decay": 0.1, "nesterov": nesterov}
        (np_,), (ns,) = sgd_step([p], [g], [{"momentum_buffer": buf}], [h])
        return np_, ns["momentum_buffer"]

    assert torch.autograd.gradcheck(f, (p, g, buf, lr, mu))
    assert torch.autograd.gradgradcheck(f, (p, g, buf, lr, mu))

    def fresh(p, g, lr, mu):  # first step: buffer = g keeps its graph
        (np_,), (ns,) = sgd_step([p], [g], [{}], [{"lr": lr, "momentum": mu, "nesterov": nesterov}])
        return np_, ns["momentum_buffer"]

    assert torch.autograd.gradcheck(fresh, (p, g, lr, mu))


@pytest.mark.parametrize("fn,amsgrad", [(adam_step, False), (adam_step, True), (adamw_step, False)])
def test_adam_gradcheck(fn, amsgrad):
    p, g = _rand(4, seed=0), _rand(4, seed=1)
    m, v = _rand(4, seed=2), _rand(4, seed=3, pos=True)
    vmax = (v.detach() + torch.tensor([0.5, -0.05, 0.5, -0.05], dtype=DT)).requires_grad_()
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    b1 = torch.tensor(0.9, dtype=DT, requires_grad=True)
    b2 = torch.tensor(0.99, dtype=DT, requires_grad=True)

    def f(p, g, m, v, vmax, lr, b1, b2):
        h = {"lr": lr, "betas": (b1, b2), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": amsgrad}
        s = {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax}
        (np_,), (ns,) = fn([p], [g], [s], [h])
        return (np_, ns["exp_avg"], ns["exp_avg_sq"]) + ((ns["max_exp_avg_sq"],) if amsgrad else ())

    assert torch.autograd.gradcheck(f, (p, g, m, v, vmax, lr, b1, b2))


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_gradcheck(centered):
    p, g, b = _rand(5, seed=0), _rand(5, seed=1), _rand(5, seed=2)
    sq, ga = _rand(5, seed=3, pos=True), (0.1 * _rand(5, seed=4)).detach().requires_grad_()
    lr, mu = torch.tensor(0.01, dtype=DT, requires_grad=True), torch.tensor(0.7, dtype=DT, requires_grad=True)

    def f(p, g, b, sq, ga, lr, mu):
        h = {"lr": lr, "momentum": mu, "alpha": 0.9, "eps": 1e-8, "centered": centered, "weight_decay": 0.05}
        s = {"step": torch.tensor(2.0), "square_avg": sq, "momentum_buffer": b, "grad_avg": ga}
        (np_,), (ns,) = rmsprop_step([p], [g], [s], [h])
        return np_, ns["momentum_buffer"], ns["square_avg"]

    assert torch.autograd.gradcheck(f, (p, g, b, sq, ga, lr, mu))


@pytest.mark.parametrize("fn,h", [(adam_step, {"lr": 0.1, "betas": (0.9, 0.99), "amsgrad": True}),
                                  (rmsprop_step, {"lr": 0.1, "alpha": 0.9, "centered": True})])
def test_zero_gradient_entries_give_finite_meta_gradients(fn, h):
    """A parameter entry with an exactly-zero gradient must not turn meta-gradients into NaN."""
    w = torch.tensor([1.0, 2.0, 0.5], dtype=DT, requires_grad=True)  # e.g. a warp parameter
    theta = torch.tensor([1.0, 0.0, -1.0], dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(((w * theta) ** 2).sum(), theta, create_graph=True)
    assert g[1] == 0
    (new,), _ = fn([theta], [g], [{}], [h])
    (dw,) = torch.autograd.grad((new**2).sum(), w)
    assert torch.isfinite(dw).all()


def test_learned_lr_meta_gradient_through_loss():
    """d/dα of L(θ − α g) equals −⟨∇L(θ'), g⟩ (create_graph path)."""
    theta = torch.randn(6, dtype=DT, requires_grad=True)
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad((theta**4).sum(), theta, create_graph=True)
    (new,), _ = sgd_step([theta], [g], [{}], [{"lr": lr}])
    (dlr,) = torch.autograd.grad((new**2).sum(), lr)
    torch.testing.assert_close(dlr, -(2 * new * g).sum().detach(), **TOL)


@pytest.mark.parametrize("fn,hyper,state_fn", [
    (sgd_step, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}, lambda p: {"momentum_buffer": torch.ones_like(p)}),
    (adam_step, {"lr": 0.1, "betas": (0.9, 0.99), "amsgrad": True, "weight_decay": 0.1},
     lambda p: {"step": torch.tensor(2.0), "exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p),
                "max_exp_avg_sq": torch.ones_like(p)}),
    (adamw_step, {"lr": 0.1, "betas": (0.9, 0.99), "weight_decay": 0.1},
     lambda p: {"step": torch.tensor(2.0), "exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p)}),
    (rmsprop_step, {"lr": 0.1, "alpha": 0.9, "momentum": 0.5, "centered": True},
     lambda p: {"step": torch.tensor(2.0), "square_avg": torch.ones_like(p), "momentum_buffer": torch.ones_like(p),
                "grad_avg": torch.zeros_like(p)}),
])
def test_inputs_not_modified(fn, hyper, state_fn):
    p, g = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)
    s = state_fn(p)
    snap = [p.clone(), g.clone()] + [v.clone() for v in s.values()]
    versions = [p._version, g._version] + [v._version for v in s.values()]
    h = dict(hyper)
    new_p, new_s = fn([p], [g], [s], [h])
    for a, b in zip([p, g] + list(s.values()), snap):
        assert torch.equal(a, b)
    assert versions == [p._version, g._version] + [v._version for v in s.values()]
    assert h == hyper
    assert new_p[0] is not p and all(new_s[0][k] is not s.get(k) for k in new_s[0])


# ----------------------------------------------------------------------------- registry


class _MyOpt(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def test_unsupported_optimizer_raises_then_register(monkeypatch):
    monkeypatch.setattr(to, "_REGISTRY", dict(to._REGISTRY))
    p = torch.zeros(2, requires_grad=True)
    for opt in (torch.optim.LBFGS([p]), _MyOpt([p])):
        with pytest.raises(TypeError) as err:
            functional_step_for(opt)
        msg = str(err.value)
        assert type(opt).__qualname__ in msg and "register_functional_step" in msg
        assert "torch.optim.sgd.SGD" in msg and "approximate" in msg

    def my_step(params, grads, states, hypers):
        return [p - h["lr"] * g for p, g, h in zip(params, grads, hypers)], [{} for _ in params]

    my_step.state_keys = ()
    register_functional_step(_MyOpt, my_step)
    opt = _MyOpt([p])
    assert functional_step_for(opt) is my_step
    with pytest.raises(TypeError):
        register_functional_step(int, my_step)


def test_lookup_exact_then_mro():
    p = torch.zeros(2, requires_grad=True)
    assert functional_step_for(torch.optim.SGD([p], lr=0.1)) is sgd_step
    assert functional_step_for(torch.optim.AdamW([p])) is adamw_step
    assert functional_step_for(torch.optim.RMSprop([p])) is rmsprop_step

    class PlainAdam(torch.optim.Adam):
        pass

    class StepAdam(torch.optim.Adam):
        def step(self, closure=None):
            return super().step(closure)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert functional_step_for(PlainAdam([p])) is adam_step
    with pytest.warns(UserWarning, match="overrides step"):
        assert functional_step_for(StepAdam([p])) is adam_step


def test_invalid_group_raises_value_error():
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    opt.param_groups[0]["dampening"] = 0.5
    with pytest.raises(ValueError, match="nesterov"):
        functional_step_for(opt)
    opt = torch.optim.Adam([p])
    del opt.param_groups[0]["betas"]
    with pytest.raises(ValueError, match="betas"):
        functional_step_for(opt)


def test_state_keys():
    assert sgd_step.state_keys == ("momentum_buffer",)
    assert state_keys_for(sgd_step, {"momentum": 0.0}) == ()
    assert state_keys_for(adam_step, {"amsgrad": True})[-1] == "max_exp_avg_sq"
    assert set(state_keys_for(rmsprop_step, {"momentum": 0.1, "centered": True})) == set(rmsprop_step.state_keys)


# ----------------------------------------------------------------------------- state round trip


@pytest.mark.parametrize("opt_cls,kw", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
    (torch.optim.AdamW, dict(lr=0.05)),
    (torch.optim.AdamW, dict(lr=0.05, fused=True)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
])
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_state_round_trip_bit_identical(opt_cls, kw, dtype):
    gen = torch.Generator().manual_seed(7)
    params = _make_params([(3, 2), (4,)], gen, dtype)
    opt = opt_cls(params, **kw)

    def step(o, ps, grads):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()

    for _ in range(3):
        step(opt, params, [_rand_like(p, gen) for p in params])
    states = optimizer_states(opt, params)
    for s in states:
        if "step" in s:
            assert s["step"].dim() == 0 and s["step"].dtype == torch.promote_types(dtype, torch.float32)

    params2 = [p.detach().clone() for p in params]
    opt2 = opt_cls(params2, **kw)
    load_optimizer_states(opt2, params2, states)
    for p, p2 in zip(params, params2):
        for k, v in opt.state.get(p, {}).items():
            v2 = opt2.state[p2][k]
            assert v2 is not v and v2.dtype == v.dtype and v2.device == v.device and v2.shape == v.shape
    for _ in range(3):
        grads = [_rand_like(p, gen) for p in params]
        step(opt, params, grads)
        step(opt2, params2, grads)
        for p, p2 in zip(params, params2):
            assert torch.equal(p, p2)
    for a, b in zip(optimizer_states(opt, params), optimizer_states(opt2, params2)):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_load_empty_state_clears_and_flat_reshape():
    p = torch.randn(2, 3, dtype=DT)
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(2, 3, dtype=DT)
    opt.step()
    load_optimizer_states(opt, [p], [{}])
    assert len(opt.state[p]) == 0
    flat = {"step": torch.tensor(5.0, dtype=DT), "exp_avg": torch.zeros(6, dtype=DT),
            "exp_avg_sq": torch.ones(6, dtype=torch.float32)}
    load_optimizer_states(opt, [p], [flat])
    assert opt.state[p]["exp_avg"].shape == (2, 3) and opt.state[p]["exp_avg_sq"].dtype == DT
    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 5.0
    with pytest.raises(ValueError):
        load_optimizer_states(opt, [torch.zeros(1)], [{}])


@pytest.mark.parametrize("kw", [dict(lr=0.4), dict(lr=0.1, weight_decay=0.01),
                                dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
                                dict(lr=0.1, momentum=0.9, nesterov=True)])
def test_sgd_step_is_bitwise_torch_sgd(kw):
    """With number hyper-parameters the functional SGD step takes torch.optim.SGD's ops
    (``add`` with ``alpha``): the same float32 values to the bit, over several steps."""
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(64, 33, generator=gen)
    theta, states = [p.clone()], [{}]
    opt = torch.optim.SGD([p], foreach=False, **kw)
    for _ in range(4):
        g = torch.randn(64, 33, generator=gen)
        theta, states = sgd_step(theta, [g], states, [opt.param_groups[0]])
        p.grad = g
        opt.step()
        assert torch.equal(theta[0], p)


def test_sgd_number_hypers_twice_differentiable():
    """The one-op update with number hyper-parameters keeps the second derivative (MAML)."""
    p, g, buf = _rand(3, 2, seed=0), _rand(3, 2, seed=1), _rand(3, 2, seed=2)

    def f(p, g, buf):
        h = {"lr": 0.1, "momentum": 0.8, "dampening": 0.2, "weight_decay": 0.1, "nesterov": False}
        (np_,), (ns,) = sgd_step([p], [g], [{"momentum_buffer": buf}], [h])
        return np_ * np_.sin(), ns["momentum_buffer"]

    assert torch.autograd.gradcheck(f, (p, g, buf))
    assert torch.autograd.gradgradcheck(f, (p, g, buf))


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.Adam, dict(lr=0.1, amsgrad=True)),
                                        (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                        (torch.optim.SGD, dict(lr=torch.tensor(0.1)))])
def test_copy_state_dict_is_a_snapshot_that_restores_the_optimizer(opt_cls, kw):
    """What session.begin / the meta-step transaction keep to undo a task or a meta-step: equal to
    the state_dict, unchanged by later steps, and load_state_dict of it puts the optimizer back."""
    from warpopt.task_optimizers import copy_state_dict
    gen = torch.Generator().manual_seed(2)
    params = _make_params([(3, 2), (4,)], gen)
    opt = opt_cls(params, **kw)

    def step():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()

    step()
    snap = copy_state_dict(opt.state_dict())
    reference = copy.deepcopy(opt.state_dict())
    step()
    step()

    def equal(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
        if isinstance(a, (dict, list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(
                equal(x, y) for x, y in (zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)))
        return a == b

    assert equal(snap, reference)  # later steps did not reach the copy
    assert not reference["state"] or not equal(snap, opt.state_dict())  # (SGD without momentum: no state)
    opt.load_state_dict(snap)
    assert equal(opt.state_dict(), reference)  # the optimizer is back where the copy was taken
