"""The task loop seen from the optimizer (warpopt/loop.py): MAML's trajectory built by the loop,
Warp-MAML's Eq. 7 term read off it, the fallbacks, and that nothing of it outlives a task."""

import copy
import functools

import pytest
import torch
from torch import nn

import warpopt

DTYPE = torch.float64
loss_fn = nn.functional.mse_loss


def make_net(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = (
        [nn.Linear(3, 5), nn.Tanh()]
        + ([nn.BatchNorm1d(5)] if bn else [])
        + [nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)]
    )
    return nn.Sequential(*layers).to(DTYPE)


def batches(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g, dtype=DTYPE)
    out = []
    for _ in range(n):
        x = torch.randn(6, 3, generator=g, dtype=DTYPE)
        out.append((x, torch.sin(x @ w)))
    return out


def maml_opt(model, unroll="loop", task_optimizer=torch.optim.SGD, algorithm=None, **kwargs):
    return warpopt.WarpGradMetaOptimizer(
        model,
        lr=0.3,
        meta_optimizer=torch.optim.SGD,
        meta_lr=1.0,
        init_lr=1.0,
        task_optimizer=task_optimizer,
        algorithm=algorithm if algorithm is not None else warpopt.algorithms.Algorithm(),
        initialisation=warpopt.maml(unroll=unroll),
        **kwargs,
    )


def theta0_step(opt, model, tasks, loop):
    """One meta-step; returns θ0 − θ0' (the meta-gradient with SGD(lr=1))."""
    before = [t.detach().clone() for t in opt.theta0]
    for data, query in tasks:
        with opt.task(data, loss_fn, meta_data=lambda k, q=query: q) as task:
            loop(opt, model, task, data)
    opt.meta_step()
    return [a - b for a, b in zip(before, opt.theta0)]


def plain_loop(opt, model, task, data):
    for x, y in task:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def fd_maml(net, theta0, tasks, lr=0.3, eps=1e-6):
    """Central differences of the mean over tasks of L_meta(θ_K(θ0)), by hand (plain SGD)."""
    params = list(net.parameters())

    def objective(point):
        total = 0.0
        for data, query in tasks:
            with torch.no_grad():
                for p, t in zip(params, point):
                    p.copy_(t)
            for x, y in data:
                grads = torch.autograd.grad(loss_fn(net(x), y), params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(lr * g)
            with torch.no_grad():
                total += loss_fn(net(query[0]), query[1]).item() / len(tasks)
        return total

    out = []
    for i, t in enumerate(theta0):
        g = torch.zeros_like(t)
        for j in range(t.numel()):
            up = [s.clone() for s in theta0]
            up[i].view(-1)[j] += eps
            down = [s.clone() for s in theta0]
            down[i].view(-1)[j] -= eps
            g.view(-1)[j] = (objective(up) - objective(down)) / (2 * eps)
        out.append(g)
    return out


def two_tasks():
    return [(batches(1), batches(9, n=1)[0]), (batches(2), batches(8, n=1)[0])]


def test_maml_in_the_loop_equals_finite_differences_and_the_replay():
    """The new path (the loop builds the trajectory) gives the second-order MAML meta-gradient:
    central differences in float64, and the replay of the K steps after the loop."""
    tasks = two_tasks()
    net = make_net()
    theta0 = [p.detach().clone() for p in net.parameters()]
    loop = theta0_step(maml_opt(net), net, tasks, plain_loop)
    net2 = make_net()
    replay = theta0_step(maml_opt(net2, unroll="replay"), net2, tasks, plain_loop)
    fd = fd_maml(make_net(), theta0, tasks)
    assert sum(g.abs().sum() for g in loop) > 1e-2
    for a, b, c in zip(loop, replay, fd):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "task_optimizer", [functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True), torch.optim.Adam]
)
def test_maml_in_the_loop_equals_the_replay_with_optimizer_state(task_optimizer):
    tasks = two_tasks()
    grads = {}
    for unroll in ("loop", "replay"):
        net = make_net()
        grads[unroll] = theta0_step(maml_opt(net, unroll, task_optimizer), net, tasks, plain_loop)
    for a, b in zip(grads["loop"], grads["replay"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_loops_grad_is_the_plain_task_gradient_and_the_loop_runs_each_forward_once():
    """After ``loss.backward()`` the live parameters hold ∇θ L_task(θ_k), as without MAML, and
    the model runs one forward per step plus the query (the replay ran each step twice)."""
    data, query = batches(3), batches(4, n=1)[0]
    counts = {}
    for unroll in ("loop", "replay"):
        net = make_net()
        ref = copy.deepcopy(net)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
        opt = maml_opt(net, unroll)
        calls = [0]
        net.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        with opt.task(data, loss_fn, meta_data=lambda k: query) as task:
            for x, y in task:
                opt.zero_grad()
                loss_fn(net(x), y).backward()
                ref_opt.zero_grad()
                loss_fn(ref(x), y).backward()
                for p, q in zip(net.parameters(), ref.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
                opt.step()
                ref_opt.step()
        counts[unroll] = calls[0]
        for p, q in zip(net.parameters(), ref.parameters()):  # the live trajectory is torch.optim's
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    assert counts == {"loop": 3 + 1, "replay": 3 + 3 + 1}


def logging_loop(opt, model, task, data):
    """A second forward per step (logging under no_grad, then a grad one on a copy of x)."""
    for x, y in task:
        with torch.no_grad():
            model(x)
        opt.zero_grad()
        loss_fn(model(x.clone()), y).backward()  # not the loop batch's tensor: no fast path
        opt.step()


def accumulating_loop(opt, model, task, data):
    """Two backwards per step (gradient accumulation over halves of the batch)."""
    for x, y in task:
        opt.zero_grad()
        (loss_fn(model(x[:3]), y[:3]) / 2).backward()
        (loss_fn(model(x[3:]), y[3:]) / 2).backward()
        opt.step()


def submodule_loop(opt, model, task, data):
    """The loop calls the layers itself, not the root module: nothing is intercepted."""
    for x, y in task:
        opt.zero_grad()
        h = x
        for layer in model:
            h = layer(h)
        loss_fn(h, y).backward()
        opt.step()


@pytest.mark.parametrize("loop", [logging_loop, accumulating_loop, submodule_loop])
def test_loops_off_the_fast_path_still_give_the_replayed_meta_gradient(loop):
    """Forwards that are not the loop batch's, several backwards per step, calls below the root
    module: the step's graph gradient is recomputed (the old cost) and the meta-gradient is the
    replay's, the live trajectory the user's."""
    tasks = two_tasks()
    grads, finals = {}, {}
    for unroll in ("loop", "replay"):
        net = make_net()
        grads[unroll] = theta0_step(maml_opt(net, unroll), net, tasks, loop)
        finals[unroll] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(grads["loop"], grads["replay"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(finals["loop"], finals["replay"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_a_loop_loss_that_is_not_the_task_loss_is_refused_and_rolled_back():
    net = make_net()
    opt = maml_opt(net)
    theta0 = [t.detach().clone() for t in opt.theta0]
    data, query = batches(3), batches(4, n=1)[0]
    with pytest.raises(ValueError, match="task's loss"):
        with opt.task(data, loss_fn, meta_data=lambda k: query) as task:
            for x, y in task:
                opt.zero_grad()
                (2 * loss_fn(net(x), y)).backward()
                opt.step()
    assert opt.counters["tasks"] == 0 and not opt.contributions.total.count
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), theta0))
    assert not net._forward_hooks and not net._forward_pre_hooks


def test_nothing_of_the_loop_outlives_a_task():
    """Hooks off, live nn.Parameters back in the module, kernel flags restored: after a task,
    after an exception inside the forward and after one between steps."""
    net = make_net()
    live = list(net.parameters())
    opt = maml_opt(net)
    data, query = batches(3), batches(4, n=1)[0]
    math_only = torch.backends.cuda.flash_sdp_enabled()

    def check():
        assert not net._forward_hooks and not net._forward_pre_hooks
        assert list(net.parameters()) == live and all(isinstance(p, nn.Parameter) for p in net.parameters())
        assert torch.backends.cuda.flash_sdp_enabled() == math_only

    with opt.task(data, loss_fn, meta_data=lambda k: query) as task:
        assert net._forward_hooks
        plain_loop(opt, net, task, data)
    check()
    with pytest.raises(RuntimeError):
        with opt.task(data, loss_fn, meta_data=lambda k: query) as task:
            for x, y in task:
                net(x[:, :2])  # wrong shape: raises inside the forward, with θ_k swapped in
    check()
    with pytest.raises(KeyboardInterrupt):
        with opt.task(data, loss_fn, meta_data=lambda k: query) as task:
            plain_loop(opt, net, task, data)
            raise KeyboardInterrupt
    check()
    opt.meta_step()  # the first task's contribution only
    with torch.no_grad():
        out = net(data[0][0])  # a plain forward with the live parameters
    assert not out.requires_grad


def test_maml_in_the_loop_on_a_warped_model_recorded_offline():
    """Offline recording and the unroll together; BatchNorm buffers (train mode); the result is
    the replay's."""
    tasks = two_tasks()
    grads, points = {}, {}
    for unroll in ("loop", "replay"):
        model = warpopt.warp(make_net(bn=True))
        opt = maml_opt(model, unroll, algorithm=warpopt.offline(), objective=warpopt.approx)
        grads[unroll] = theta0_step(opt, model, tasks, plain_loop)
        points[unroll] = opt.counters["warp_updates"]
    assert points["loop"] == points["replay"] == 2 * 4
    for a, b in zip(grads["loop"], grads["replay"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def warp_maml(model, objective):
    return warpopt.WarpGradMetaOptimizer(
        model,
        lr=0.3,
        meta_optimizer=torch.optim.SGD,
        meta_lr=1.0,
        init_lr=1.0,
        objective=objective,
        algorithm=warpopt.online(),
        initialisation=warpopt.maml(),
    )


def exact_by_another_name(context, sample):
    return warpopt.exact(context, sample)


@pytest.mark.parametrize("bn", [False, True])
def test_warp_maml_reads_eq7_off_the_loop_and_equals_the_replayed_objective(bn, monkeypatch):
    """online() + exact + maml(): the Eq. 7 term taken from the unrolled step (and, without adapt
    buffers, merged with the θ0 term's query pass) equals the objective replayed at each live
    θ_k (the same function under another name takes the old path); φ and θ0 both move."""
    # forwards are counted below: leave out the sampled first-step check (one forward per checked task)
    monkeypatch.setattr(warpopt.step_check, "due", lambda task_index: False)
    tasks = two_tasks()
    result, forwards = {}, {}
    for name, objective in (("fast", warpopt.exact), ("replayed", exact_by_another_name)):
        model = warpopt.warp(make_net(bn=bn))
        opt = warp_maml(model, objective)
        phi = [p.detach().clone() for p in model.warp_parameters()]
        calls = [0]
        model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        theta = theta0_step(opt, model, tasks, plain_loop)
        result[name] = theta + [a - b for a, b in zip(phi, model.warp_parameters())]
        forwards[name] = calls[0]
    assert sum(g.abs().sum() for g in result["fast"]) > 1e-2
    # per task of 3 steps: the loop's forward and the query's per step (+ the θ0 term's own query
    # with adapt buffers); replayed: + the objective's inner forward per step
    assert forwards == {"fast": 2 * (3 * 2 + bn), "replayed": 2 * (3 * 3 + 1)}
    for a, b in zip(result["fast"], result["replayed"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_warp_maml_with_fresh_task_batches_replays_the_objective():
    """When the objective's task batch is not the loop's (a source drawing fresh batches), Eq. 7
    is replayed on the batches it drew, as before."""
    result = {}
    for name, objective in (("fast", warpopt.exact), ("replayed", exact_by_another_name)):
        model = warpopt.warp(make_net())
        opt = warp_maml(model, objective)
        phi = [p.detach().clone() for p in model.warp_parameters()]
        data, query = batches(5, n=4), batches(6, n=1)[0]
        with opt.task(lambda k: data[k % 4], loss_fn, meta_data=lambda k: query):
            for k in range(3):
                x, y = data[(k + 1) % 4]  # the loop trains on another batch than task_batch(k)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        opt.meta_step()
        result[name] = [a - b for a, b in zip(phi, model.warp_parameters())]
    for a, b in zip(result["fast"], result["replayed"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_maml_unroll_is_validated():
    with pytest.raises(ValueError, match="unroll"):
        warpopt.maml(unroll="twice")
    assert warpopt.maml().unrolls and not warpopt.maml(unroll="replay").unrolls


class TiedNet(nn.Module):
    """Two layers sharing one weight (tied: one Parameter in two modules), the output a tensor,
    a tuple or a dict (the loop's fast path for a single tensor, the tree walk for the others)."""

    def __init__(self, out):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)
        self.dec.weight = self.enc.weight
        self.out = out
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.dec(torch.tanh(self.enc(x))))
        y = self.head(h)
        return {"tensor": y, "tuple": (y, h), "dict": {"h": h, "y": y}}[self.out]


@pytest.mark.parametrize("out", ["tensor", "tuple", "dict"])
def test_maml_in_the_loop_with_tied_weights_and_structured_outputs_equals_the_replay(out):
    """A weight held by two modules is swapped in both (θ_k everywhere the forward reads it), and
    outputs of any structure reach the loss: the loop's meta-gradient is the replay's."""

    def pick(o):
        return o if out == "tensor" else o[0] if out == "tuple" else o["y"]

    def task_loss(o, y):
        return loss_fn(pick(o), y)

    grads, finals = {}, {}
    for unroll in ("loop", "replay"):
        net = TiedNet(out)
        assert len(list(net.parameters())) == 5  # the tied weight once
        opt = maml_opt(net, unroll)
        before = [t.detach().clone() for t in opt.theta0]
        for data, query in two_tasks():
            with opt.task(data, task_loss, meta_data=lambda k, q=query: q) as task:
                for x, y in task:
                    opt.zero_grad()
                    task_loss(net(x), y).backward()
                    opt.step()
        opt.meta_step()
        grads[unroll] = [a - b for a, b in zip(before, opt.theta0)]
        finals[unroll] = [p.detach().clone() for p in net.parameters()]
        assert net.dec.weight is net.enc.weight and isinstance(net.enc.weight, nn.Parameter)
    assert all(g.abs().sum() > 0 for g in grads["loop"])
    for a, b in zip(grads["loop"], grads["replay"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(finals["loop"], finals["replay"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nonfinite_gradient_at_any_step_of_a_maml_task_drops_it(policy):
    """The task's end checks θ_K, which a NaN/inf gradient entry leaves non-finite from its step
    on: a NaN at a middle step (not the last) still drops the task and restores everything."""
    net = make_net()
    opt = maml_opt(net, on_nonfinite=policy)
    (data, query), (bad, bad_query) = two_tasks()
    with opt.task(data, loss_fn, meta_data=lambda k: query) as task:
        plain_loop(opt, net, task, data)
    theta0 = [t.detach().clone() for t in opt.theta0]
    live = [p.detach().clone() for p in net.parameters()]
    contributions = opt.contributions
    bad = [(x.clone(), y) for x, y in bad]
    bad[1][0][0, 0] = float("nan")
    seen = []
    context = (
        pytest.raises(FloatingPointError, match="NaN")
        if policy == "raise"
        else pytest.warns(RuntimeWarning, match="dropped")
    )
    with context:
        with opt.task(bad, loss_fn, meta_data=lambda k: bad_query) as task:
            for k, (x, y) in enumerate(task):
                opt.zero_grad()
                loss_fn(net(x), y).backward()
                opt.step()
                seen.append(k)
    assert seen == [0, 1, 2]  # every step ran: the drop is decided at the end
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), live))
    assert all(torch.equal(p, q) for p, q in zip(opt.theta0, theta0))
    assert opt.contributions is contributions and opt.counters["tasks"] == 1
    opt.meta_step()  # the first task's contribution only


def test_maml_in_the_loop_with_continual_warp_updates_is_refused_at_construction():
    # continual() updates φ in place inside the task; the loop's MAML graph runs through φ, so the
    # task's backward failed with autograd's "modified by an inplace operation".
    model = warpopt.warp(make_net())
    with pytest.raises(ValueError, match="maml\\(\\).*updates φ in place inside the task.*unroll='replay'"):
        maml_opt(model, algorithm=warpopt.continual(every=2))
    opt = maml_opt(model, unroll="replay", algorithm=warpopt.continual(every=2))  # the suggested way works
    with opt.task(batches(1, n=4), loss_fn) as task:
        for x, y in task:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert opt.counters["warp_updates"] == 2
    maml_opt(make_net(), algorithm=warpopt.continual(every=2))  # θ0 only: no φ to update, accepted


@pytest.mark.parametrize("unroll", ["loop", "replay"])
def test_maml_differentiates_the_steps_taken_under_a_scheduler_and_clipping(unroll):
    # Each step's lr (LambdaLR) and clip_grad_norm_ are the step's own; unroll="replay" used the
    # param groups as they were at the task's end and no clipping.
    net = make_net()
    opt = maml_opt(net, unroll=unroll)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k))
    data, query = batches(1, n=4), batches(9, n=1)[0]
    theta0 = [p.detach().clone() for p in net.parameters()]

    def loop(opt, model, task, data):
        for x, y in task:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.clip_grad_norm_(0.1)
            opt.step()
            scheduler.step()

    got = theta0_step(opt, net, [(data, query)], loop)
    names = [n for n, _ in net.named_parameters()]
    start = [t.clone().requires_grad_(True) for t in theta0]
    theta = start
    for k, (x, y) in enumerate(data):  # θ_{k+1} = θ_k − α_k clip(∇L(θ_k)), by hand
        g = torch.autograd.grad(
            loss_fn(torch.func.functional_call(net, dict(zip(names, theta)), (x,)), y), theta, create_graph=True
        )
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        assert norm > 0.1  # the clip is active
        theta = [t - 0.3 / (1 + k) * gi * (0.1 / (norm + 1e-6)) for t, gi in zip(theta, g)]
    expected = torch.autograd.grad(
        loss_fn(torch.func.functional_call(net, dict(zip(names, theta)), (query[0],)), query[1]), start
    )
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def fast_then_off_loop(opt, model, task, data):
    """Step 0 on the fast path; from step 1 the loop trains on a copy of its batch (other memory):
    the unrolled trajectory is no longer known to be the live one, Eq. 7 is replayed."""
    for k, (x, y) in enumerate(task):
        opt.zero_grad()
        loss_fn(model(x if k == 0 else x.clone()), y).backward()
        opt.step()


def test_warp_maml_keeps_the_pending_eq7_term_when_the_next_step_is_replayed(monkeypatch):
    """Step k's Eq. 7 term is pending until step k+1; when step k+1's term is replayed instead
    (the loop left the fast path), step k's pending term is still counted: every step gives one
    term (K per task) and φ, θ0 equal the objective replayed at every step."""
    monkeypatch.setattr(warpopt.step_check, "due", lambda task_index: False)
    tasks = two_tasks()
    result, counts = {}, {}
    for name, objective in (("fast", warpopt.exact), ("replayed", exact_by_another_name)):
        model = warpopt.warp(make_net())
        opt = warp_maml(model, objective)
        phi = [p.detach().clone() for p in model.warp_parameters()]
        theta0 = [t.detach().clone() for t in opt.theta0]
        for data, query in tasks:
            with opt.task(data, loss_fn, meta_data=lambda k, q=query: q) as task:
                fast_then_off_loop(opt, model, task, data)
        counts[name] = opt.algorithm_state.count
        opt.meta_step()
        result[name] = [a - b for a, b in zip(phi, model.warp_parameters())] + [
            a - b for a, b in zip(theta0, opt.theta0)
        ]
    assert counts == {"fast": 6, "replayed": 6}  # 2 tasks × 3 steps
    assert sum(g.abs().sum() for g in result["fast"]) > 1e-2
    for a, b in zip(result["fast"], result["replayed"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
