"""Numerical checks of the meta-objectives (Eq. 7, Eq. 8) in float64."""
import pytest
import torch
from torch import nn

import warpopt
from warpopt.objectives import ReplayContext, approx, exact, meta_gradient
from warpopt.task_optimizers import functional_step_for, optimizer_states
from warpopt.tasks import Task
from warpopt.trajectory import Sample



@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _warped_mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model = warpopt.warp(net)
    with torch.no_grad():  # a non-identity warp, so second-order terms are not trivial
        for p in model.warp_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _fixed_task(seed=1):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g))
    b = (torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g))
    # L_task on batch a, L_meta on batch b, every time: deterministic objectives.
    return Task(lambda k: a, nn.functional.mse_loss, meta_data=lambda k: b)


def _context(model, optimizer, hypers=None):
    names = [n for n, _ in model.named_adapt_parameters()]
    buffers = [n for n, _ in model.named_adapt_buffers()]
    group = optimizer.param_groups[0]
    return ReplayContext(model, names, buffers, functional_step_for(optimizer),
                         hypers or [group] * len(names))


def _sample(model, optimizer, task, steps=2):
    """θ_k after a few real optimizer steps, with the optimizer's state at θ_k."""
    params = list(model.adapt_parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        x, y = task.task_batch(0)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    states = [{k: v.clone() for k, v in s.items()} for s in optimizer_states(optimizer, params)]
    return Sample(task, 0, steps, [p.detach().clone() for p in params], states, [])


def _finite_difference(fn, params, eps=1e-6):
    grads = []
    for p in params:
        g = torch.zeros_like(p)
        flat, gflat = p.data.view(-1), g.view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + eps
            up = fn().item()
            flat[i] = orig - eps
            down = fn().item()
            flat[i] = orig
            gflat[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def _rel_error(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return ((a - b).norm() / b.norm()).item()


def _check_exact_against_fd(optimizer_cls, **kwargs):
    model = _warped_mlp()
    task = _fixed_task()
    optimizer = optimizer_cls(model.adapt_parameters(), **kwargs)
    sample = _sample(model, optimizer, task)
    ctx = _context(model, optimizer)
    phi = list(model.warp_parameters())
    grads, _ = meta_gradient(exact, ctx, [sample], phi)
    fd = _finite_difference(lambda: exact(ctx, sample).detach(), phi)
    assert _rel_error(grads, fd) <= 1e-5


def test_exact_meta_gradient_matches_finite_differences_sgd():
    _check_exact_against_fd(torch.optim.SGD, lr=0.1)


def test_exact_meta_gradient_matches_finite_differences_momentum():
    _check_exact_against_fd(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True)


def test_exact_meta_gradient_matches_finite_differences_adam():
    _check_exact_against_fd(torch.optim.Adam, lr=0.01)



class _LeakyReLU(torch.autograd.Function):
    """An autograd.Function written the pre-torch.func way (no setup_context), as users have."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x > 0, x, 0.1 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.where(x > 0, 1.0, 0.1)


class _CustomNet(nn.Module):
    def __init__(self, checkpoint=False):
        super().__init__()
        self.checkpoint = checkpoint
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = _LeakyReLU.apply(self.a(x))
        block = lambda t: torch.tanh(self.b(t))  # noqa: E731
        h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if self.checkpoint else block(h)
        return self.out(h)


def _custom_net():
    torch.manual_seed(0)
    model = warpopt.warp(_CustomNet(), exclude="out")
    with torch.no_grad():
        for p in model.warp_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_replay_runs_autograd_functions_written_without_setup_context():
    # torch.func.grad refuses such a Function: the per-sample replay differentiates with autograd.
    from finite_differences import check_exact_meta_gradient

    model, task = _custom_net(), _fixed_task()
    (a, b), meta = task.task_batch(0), task.meta_batch(0)
    assert check_exact_meta_gradient(model, (a, b), meta, nn.functional.mse_loss, lr=0.1) <= 1e-6
    # approx: ∇φ L_meta at the updated θ held fixed, by hand
    optimizer = torch.optim.SGD(model.adapt_parameters(), lr=0.1)
    sample = _sample(model, optimizer, task)
    phi = list(model.warp_parameters())
    grads, _ = meta_gradient(approx, _context(model, optimizer), [sample], phi)
    theta = [p.detach().clone().requires_grad_(True) for p in sample.params]
    names = [n for n, _ in model.named_adapt_parameters()]
    at = lambda params, x: torch.func.functional_call(model, dict(zip(names, params)), (x,))  # noqa: E731
    step = torch.autograd.grad(nn.functional.mse_loss(at(theta, a), b), theta)
    updated = [t.detach() - 0.1 * g for t, g in zip(theta, step)]
    with warpopt.objectives.trainable(phi):
        expected = torch.autograd.grad(nn.functional.mse_loss(at(updated, meta[0]), meta[1]), phi)
    assert _rel_error(grads, expected) <= 1e-12


@pytest.mark.parametrize("initialisation", ["leap", "maml"])
def test_activation_checkpointing_is_refused_with_a_reason(initialisation):
    # Its recomputation runs in the backward pass, after the replay (or MAML's unrolled forward)
    # has put the live parameters back: it would differentiate the wrong θ, silently.
    model = _custom_net()
    model.checkpoint = True
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=getattr(warpopt, initialisation)())
    phi = [p.detach().clone() for p in model.warp_parameters()]
    task = _fixed_task()
    with pytest.raises(RuntimeError, match="checkpointing"):
        with opt.task(lambda k: task.task_batch(k), nn.functional.mse_loss):
            for k in range(2):
                opt.zero_grad()
                x, y = task.task_batch(k)
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        opt.meta_step()
    assert all(torch.equal(p, q) for p, q in zip(model.warp_parameters(), phi))


def test_learned_lr_meta_gradient_matches_finite_differences():
    model = _warped_mlp()
    task = _fixed_task()
    optimizer = torch.optim.SGD(model.adapt_parameters(), lr=0.1, momentum=0.5)
    sample = _sample(model, optimizer, task)
    lr = torch.tensor(0.1, requires_grad=True)
    momentum = torch.tensor(0.5, requires_grad=True)
    hypers = [{**optimizer.param_groups[0], "lr": lr, "momentum": momentum}] * 6
    ctx = _context(model, optimizer, hypers)
    grads, _ = meta_gradient(exact, ctx, [sample], [lr, momentum])
    fd = _finite_difference(lambda: exact(ctx, sample).detach(), [lr, momentum])
    assert _rel_error(grads, fd) <= 1e-5


def test_approx_is_exact_minus_the_second_order_term():
    """Scalar model h(x) = t·w·x, squared losses: the second-order term is known in closed form."""
    model = warpopt.warp(nn.Sequential(nn.Linear(1, 1, bias=False)), where=nn.Linear,
                         layer=lambda c, d: warpopt.LinearWarp(c, d, bias=False))
    (w,), (t,) = list(model.adapt_parameters()), list(model.warp_parameters())
    with torch.no_grad():
        w.fill_(0.7)
        t.fill_(1.3)
    x, y, xm, ym, alpha = 0.9, 0.2, -1.1, 0.5, 0.1
    batch = (torch.tensor([[x]]), torch.tensor([[y]]))
    meta = (torch.tensor([[xm]]), torch.tensor([[ym]]))
    half_sq = lambda out, target: 0.5 * (out - target).pow(2).sum()
    task = Task(lambda k: batch, half_sq, meta_data=lambda k: meta)
    optimizer = torch.optim.SGD(model.adapt_parameters(), lr=alpha)
    sample = Sample(task, 0, 0, [w.detach().clone()], [{}], [])
    ctx = _context(model, optimizer)
    (g_exact,), _ = meta_gradient(exact, ctx, [sample], [t])
    (g_approx,), _ = meta_gradient(approx, ctx, [sample], [t])

    wv, tv = 0.7, 1.3
    grad_w = (tv * wv * x - y) * tv * x           # ∂L_task/∂w
    w1 = wv - alpha * grad_w                      # θ' = θ − α∇L_task
    r = tv * w1 * xm - ym                         # meta residual
    direct = r * w1 * xm                          # ∂L_meta/∂t at fixed θ' (Eq. 8)
    dgrad_dt = wv * x * tv * x + (tv * wv * x - y) * x
    second_order = r * tv * xm * (-alpha) * dgrad_dt
    assert torch.allclose(g_approx, torch.tensor(direct).reshape_as(g_approx), atol=1e-12)
    assert torch.allclose(g_exact, torch.tensor(direct + second_order).reshape_as(g_exact), atol=1e-12)
    assert abs(second_order) > 1e-3  # the case really has a second-order term


def test_approx_equals_exact_minus_autograd_second_order_term_on_mlp():
    model = _warped_mlp()
    task = _fixed_task()
    optimizer = torch.optim.SGD(model.adapt_parameters(), lr=0.1)
    sample = _sample(model, optimizer, task)
    ctx = _context(model, optimizer)
    phi = list(model.warp_parameters())
    g_exact, _ = meta_gradient(exact, ctx, [sample], phi)
    g_approx, _ = meta_gradient(approx, ctx, [sample], phi)
    theta = [p.detach().requires_grad_() for p in sample.params]
    loss = task.task_loss(ctx.forward_at(theta, []), task.task_batch())
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    updated = [p - 0.1 * g for p, g in zip(theta, grads)]
    upd_leaf = [u.detach().requires_grad_() for u in updated]
    meta = task.meta_loss(ctx.forward_at(upd_leaf, []), task.meta_batch())
    v = torch.autograd.grad(meta, upd_leaf)
    second = torch.autograd.grad(grads, phi, grad_outputs=[-0.1 * vi for vi in v], allow_unused=True)
    for ge, ga, s in zip(g_exact, g_approx, second):
        s = torch.zeros_like(ge) if s is None else s
        assert torch.allclose(ga, ge - s, atol=1e-10)
    assert _rel_error(g_approx, g_exact) > 1e-4


def test_replayed_step_reproduces_the_recorded_update():
    """The differentiable step from a recorded (θ_k, state_k) lands on the recorded θ_{k+1}."""
    model = _warped_mlp()
    task = _fixed_task()
    for cls, kw in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.Adam, dict(lr=0.01))):
        optimizer = cls(model.adapt_parameters(), **kw)
        sample = _sample(model, optimizer, task, steps=3)
        ctx = _context(model, optimizer)
        theta = [p.clone().requires_grad_() for p in sample.params]
        _, grads = ctx.task_gradient(sample, theta, create_graph=False)
        with torch.no_grad():
            predicted, _ = ctx.step(theta, grads, sample.states, ctx.hypers)
        optimizer.zero_grad()
        x, y = task.task_batch(0)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        for p, q in zip(predicted, model.adapt_parameters()):
            assert torch.allclose(p, q, atol=1e-12)
