"""Core v2: explicit state, all-or-nothing meta-steps, validated state I/O, θ0-only learning."""
import ast
import copy
import math
import pathlib
import warnings

import pytest
import torch
from torch import nn

import warpopt
from warpopt import checkpoint

DTYPE = torch.float64
loss_fn = nn.functional.mse_loss


def make_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)).to(DTYPE)


def batches(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g, dtype=DTYPE)
    out = []
    for _ in range(n):
        x = torch.randn(6, 3, generator=g, dtype=DTYPE)
        out.append((x, torch.sin(x @ w)))
    return out


def adapt(opt, model, seeds=(1, 2), steps=3):
    for s in seeds:
        data = batches(s)
        source = lambda k, data=data: data[k % len(data)]  # noqa: E731 - deterministic in k
        with opt.task(source, loss_fn):
            for k in range(steps):
                x, y = source(k)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()


def full_state(opt):
    """Everything a meta-step may touch, as plain tensors/values."""
    return {"sd": checkpoint._snapshot(opt), "points": len(opt.replay),
            "rng": torch.get_rng_state(), "model": copy.deepcopy(opt.model.state_dict())}


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)  # bit-identical
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


class Fault(Exception):
    pass


def build(algorithm=None, initialisation=None, reduce=None, **kwargs):
    model = warpopt.warp(make_net())
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-2, algorithm=algorithm or warpopt.offline(),
                                        initialisation=initialisation or warpopt.leap(), reduce=reduce, **kwargs)
    return model, opt


def armed_reduce(arm, at):
    calls = {"n": 0}

    def reduce(grads):
        calls["n"] += 1
        if arm["on"] and calls["n"] == at:
            raise Fault("all-reduce failed")
        return grads

    return reduce


@pytest.mark.parametrize("phase", ["warp_update", "theta0_update", "reduce", "pre_hook", "post_hook",
                                   "keyboard_interrupt", "online_warp_update"])
def test_a_fault_in_any_phase_of_meta_step_changes_nothing_and_a_retry_is_bit_identical(phase):
    algorithm = (lambda: warpopt.online()) if phase == "online_warp_update" else (lambda: warpopt.offline())
    reference_model, reference = build(algorithm())
    adapt(reference, reference_model)
    reference.meta_step()
    expected = full_state(reference)

    arm = {"on": True}
    model, opt = build(algorithm(), reduce=armed_reduce(arm, at=3) if phase == "reduce" else None)
    adapt(opt, model)
    before = full_state(opt)
    if phase in ("warp_update", "keyboard_interrupt", "online_warp_update"):
        calls = {"n": 0}
        real = opt.meta.apply_phi

        def apply_phi(grads):
            calls["n"] += 1
            if arm["on"] and calls["n"] == (1 if phase == "online_warp_update" else 4):  # after 3 real updates
                raise KeyboardInterrupt() if phase == "keyboard_interrupt" else Fault("warp update")
            return real(grads)

        opt.meta.apply_phi = apply_phi
    elif phase == "theta0_update":
        real_step = opt.init_optimizer.step

        def step(*a, **k):
            if arm["on"]:
                raise Fault("θ0 update")
            return real_step(*a, **k)

        opt.init_optimizer.step = step
    elif phase == "pre_hook":
        opt.register_meta_step_pre_hook(lambda o: (_ for _ in ()).throw(Fault("hook")) if arm["on"] else None)
    elif phase == "post_hook":
        opt.register_meta_step_post_hook(lambda o, s: (_ for _ in ()).throw(Fault("hook")) if arm["on"] else None)
    with pytest.raises(KeyboardInterrupt if phase == "keyboard_interrupt" else Fault):
        opt.meta_step()
    assert_same(full_state(opt), before)  # nothing changed, the meta-batch is still there
    arm["on"] = False
    opt.meta_step()
    assert_same(full_state(opt), expected)  # the retry is the uninterrupted run


def test_a_failed_commit_keeps_buffer_counters_and_theta0_terms_as_they_were():
    model, opt = build()
    adapt(opt, model, seeds=(1,))
    before = full_state(opt)
    contributions, counters = opt.contributions, dict(opt.counters)
    real_put, calls = opt.replay.storage.put, {"n": 0}

    def put(point):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_put(point)

    opt.replay.storage.put = put
    with pytest.raises(OSError):
        adapt(opt, model, seeds=(2,))
    assert opt.contributions is contributions and opt.counters == counters
    assert_same(full_state(opt), before)  # θ rolled back too, and no point of the failed task kept
    opt.replay.storage.put = real_put
    adapt(opt, model, seeds=(2,))
    assert len(opt.replay) == 2 * before["points"] and opt.counters["tasks"] == 2


@pytest.mark.parametrize("other, field", [
    (lambda: build(warpopt.online())[1], "algorithm"),
    (lambda: build(initialisation=warpopt.reptile())[1], "initialisation"),
    (lambda: build(task_optimizer=torch.optim.Adam)[1], "task_optimizer"),
    (lambda: build(objective=warpopt.approx)[1], "objective"),
    (lambda: warpopt.WarpGradMetaOptimizer(warpopt.warp(nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 1))
                                                        .to(DTYPE)), lr=0.1), "adapt_parameters|theta0"),
    (lambda: build(learn_lr=True)[1], "hyperparameters|learned"),
])
def test_a_mismatched_state_dict_is_refused_naming_the_field_and_changes_nothing(other, field):
    model, opt = build()
    adapt(opt, model)
    opt.meta_step()
    foreign = other().state_dict()
    before = full_state(opt)
    with pytest.raises(ValueError, match=field):
        opt.load_state_dict(foreign)
    assert_same(full_state(opt), before)


def test_a_state_dict_with_a_wrong_shape_or_dtype_is_refused_before_anything_changes():
    model, opt = build()
    adapt(opt, model)
    opt.meta_step()
    sd = opt.state_dict()
    before = full_state(opt)
    bad = copy.deepcopy(sd)
    bad["warp"][0] = bad["warp"][0].float()
    with pytest.raises(ValueError, match=r"'warp'\[0\].*float64"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["theta0"][-1] = torch.zeros(3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"'theta0'\[5\]"):
        opt.load_state_dict(bad)
    assert_same(full_state(opt), before)
    opt.load_state_dict(sd)  # the good one loads


def test_a_malformed_state_dict_is_refused_with_a_value_error_before_anything_changes():
    model, opt = build()
    adapt(opt, model, seeds=(1,))
    sd = opt.state_dict()  # mid meta-batch: one pending task
    adapt(opt, model, seeds=(2,))
    before = full_state(opt)
    sabotage = {
        "'replay'": lambda s: s.__setitem__("replay", {"x": 1}),
        "'replay'.*generator": lambda s: s["replay"].__setitem__("generator", torch.zeros(3)),
        "'algorithm_state.count'": lambda s: s["algorithm_state"].__setitem__("count", "a"),
        "'contributions.count'": lambda s: s["contributions"].__setitem__("count", None),
        "'counters.tasks'": lambda s: s["counters"].__setitem__("tasks", "1"),
        "tasks=\\[0\\]": lambda s: s["pending"]["tasks"][0].__setitem__("kind", "a tape"),
    }
    for match, damage in sabotage.items():
        bad = copy.deepcopy(sd)
        damage(bad)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad, tasks=[warpopt.Task(lambda k: batches(1)[k % 4], loss_fn)])
        assert_same(full_state(opt), before)


def test_state_dict_is_a_snapshot_that_later_training_never_mutates():
    model, opt = build(task_optimizer=torch.optim.Adam)
    adapt(opt, model)
    opt.meta_step()
    sd = opt.state_dict()
    saved = copy.deepcopy(sd)
    adapt(opt, model)
    opt.meta_step()
    assert_same(sd, saved)


def _maml_fd(model, theta0, batches_used, query, lr, eps=1e-6):
    params = list(model.parameters())

    def maml_loss():
        with torch.no_grad():
            for p, t in zip(params, probe):
                p.copy_(t)
        with torch.enable_grad():
            for x, y in batches_used:
                grads = torch.autograd.grad(loss_fn(model(x), y), params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(lr * g)
            return loss_fn(model(query[0]), query[1]).item()

    grads = []
    for i, t in enumerate(theta0):
        g = torch.zeros_like(t)
        for j in range(t.numel()):
            probe = [s.clone() for s in theta0]
            probe[i].view(-1)[j] += eps
            up = maml_loss()
            probe = [s.clone() for s in theta0]
            probe[i].view(-1)[j] -= eps
            down = maml_loss()
            g.view(-1)[j] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("source", ["generator_through_the_task", "list_iterated_directly"])
def test_maml_differentiates_the_trajectory_the_loop_took(source):
    """θ0-only MAML on an unwarped model; the data is an iterable, the gradient that of the
    batches the loop used, in its order (finite differences in float64)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    theta0 = [p.detach().clone() for p in net.parameters()]
    data, query = batches(5, n=4), batches(6, n=1)[0]
    opt = warpopt.WarpGradMetaOptimizer(net, lr=0.3, meta_optimizer=torch.optim.SGD, meta_lr=1.0,
                                        algorithm=warpopt.online(), initialisation=warpopt.maml())
    if source == "generator_through_the_task":
        with opt.task((b for b in data), loss_fn, meta_data=lambda k: query) as task:
            for x, y in task:
                opt.zero_grad()
                loss_fn(net(x), y).backward()
                opt.step()
    else:
        with opt.task(data, loss_fn, meta_data=lambda k: query):
            for x, y in data:
                opt.zero_grad()
                loss_fn(net(x), y).backward()
                opt.step()
    opt.meta_step()
    maml_grad = [a - b for a, b in zip(theta0, opt.theta0)]
    fd = _maml_fd(net, theta0, data, query, lr=0.3)
    for a, b in zip(maml_grad, fd):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_maml_refuses_a_one_shot_iterable_it_did_not_see_and_rolls_the_task_back():
    net = make_net()
    opt = warpopt.WarpGradMetaOptimizer(net, lr=0.1, algorithm=warpopt.online(), initialisation=warpopt.maml())
    data = batches(5)
    gen = (b for b in data)
    with pytest.raises(ValueError, match="iterate.*task"):
        with opt.task(gen, loss_fn, meta_data=lambda k: data[0]):
            for x, y in gen:
                opt.zero_grad()
                loss_fn(net(x), y).backward()
                opt.step()
    assert opt.counters["tasks"] == 0
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), opt.theta0))


@pytest.mark.parametrize("learner", ["leap", "reptile", "maml", "fomaml"])
def test_theta0_only_meta_learning_on_a_model_without_warps(learner):
    net = make_net()
    opt = warpopt.WarpGradMetaOptimizer(net, lr=0.1, meta_optimizer=torch.optim.SGD, meta_lr=1.0,
                                        initialisation=getattr(warpopt, learner)())
    assert opt.meta_parameters() == [] and opt.meta_optimizer is None
    theta0 = [t.detach().clone() for t in opt.theta0]
    adapt(opt, net, seeds=(1,))
    final = [p.detach().clone() for p in net.parameters()]
    stats = opt.meta_step()
    assert stats["warp_updates"] == 0 and len(opt.replay) == 0
    moved = [a - b for a, b in zip(theta0, opt.theta0)]
    assert sum(m.abs().sum() for m in moved) > 0
    if learner == "reptile":  # θ0 ← θ0 − 1·(θ0 − θ_K) = θ_K
        for t, f in zip(opt.theta0, final):
            torch.testing.assert_close(t.detach(), f)


def test_algorithm2_theta0_every_mini_batch_applies_the_same_total_in_as_many_updates():
    results = {}
    for schedule in ("meta_step", "mini_batch"):
        model = warpopt.warp(make_net())
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=0.0, init_lr=0.5, meta_optimizer=torch.optim.SGD,
                                            algorithm=warpopt.offline(batch_size=2, theta0=schedule))
        steps = {"n": 0}
        opt.init_optimizer.register_step_post_hook(lambda *a: steps.__setitem__("n", steps["n"] + 1))
        adapt(opt, model)
        points = len(opt.replay)
        assert points == 2 * (3 + 1)  # (K + 1)·|B|: θ_K included
        opt.meta_step()
        results[schedule] = ([t.detach().clone() for t in opt.theta0], steps["n"])
    assert results["meta_step"][1] == 1 and results["mini_batch"][1] == 4  # 8 points in mini-batches of 2
    for a, b in zip(results["meta_step"][0], results["mini_batch"][0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # meta SGD is linear: same total
    with pytest.raises(ValueError, match="theta0"):
        warpopt.offline(theta0="sometimes")


class NaNLearner(warpopt.InitialisationLearner):
    def end_task(self, state, view):
        return [torch.full_like(p, math.nan) for p in view.params]


def test_a_nan_theta0_update_is_detected_and_skip_drops_only_it():
    model, opt = build(initialisation=NaNLearner())
    adapt(opt, model)
    before = full_state(opt)
    with pytest.raises(FloatingPointError, match="θ0 meta-gradient"):
        opt.meta_step()
    assert_same(full_state(opt), before)
    model, opt = build(initialisation=NaNLearner(), on_nonfinite="skip")
    adapt(opt, model)
    theta0 = [t.detach().clone() for t in opt.theta0]
    warp = [p.detach().clone() for p in model.warp_parameters()]
    with pytest.warns(RuntimeWarning, match="θ0 meta-gradient"):
        opt.meta_step()
    assert all(torch.equal(a, b) for a, b in zip(theta0, opt.theta0))
    assert any(not torch.equal(a, b) for a, b in zip(warp, model.warp_parameters()))


@pytest.mark.parametrize("kwargs", [dict(lr=-0.1), dict(lr=math.nan), dict(meta_lr=-1e-3), dict(meta_lr=math.inf),
                                    dict(init_lr=math.nan), dict(learned_lr=-1.0, learn_lr=True)])
def test_invalid_rates_are_refused_at_construction(kwargs):
    model = warpopt.warp(make_net())
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        warpopt.WarpGradMetaOptimizer(model, **args)


def test_a_param_group_changed_to_an_invalid_rate_is_refused_before_the_step():
    model, opt = build()
    data = batches(1)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        with opt.task(data, loss_fn):
            opt.param_groups[0]["lr"] = math.nan
            x, y = data[0]
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert all(torch.equal(p, t) for p, t in zip(model.adapt_parameters(), opt.theta0))
    opt.param_groups[0]["lr"] = 0.1
    adapt(opt, model)
    opt.meta.warp_optimizer.param_groups[0]["lr"] = -1.0
    before = full_state(opt)
    with pytest.raises(ValueError, match="meta_lr"):
        opt.meta_step()
    assert_same(full_state(opt), before)


def test_continual_honours_skip_for_a_nonfinite_meta_gradient():
    model = warpopt.warp(make_net())
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, algorithm=warpopt.continual(every=2),
                                        initialisation=warpopt.none(), on_nonfinite="skip")
    warp = [p.detach().clone() for p in model.warp_parameters()]
    x, y = batches(1)[0]
    with pytest.warns(RuntimeWarning, match="warp meta-gradient"):
        for k in range(2):
            opt.zero_grad()
            loss = loss_fn(model(x), y) * (math.nan if k == 1 else 1.0)
            loss.backward()
            for p in model.adapt_parameters():  # keep θ finite: only φ's harvested gradient is NaN
                p.grad = torch.nan_to_num(p.grad)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(warp, model.warp_parameters()))
    assert opt.counters["warp_updates"] == 0


ROOT = pathlib.Path(warpopt.__file__).parent


def test_no_import_cycle_in_the_package():
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("warpopt",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                    candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                else:
                    candidates = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps.update(c for c in candidates if c in modules and c != name)
        # a package's __init__ re-exports its modules: importing a submodule does not import siblings
        graph[name] = {d for d in deps if not (path.name != "__init__.py" and name.startswith(d + "."))}
    state = {}

    def visit(node, stack):
        state[node] = "active"
        for dep in graph[node]:
            if state.get(dep) == "active":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
    assert "warpopt.meta_optimizer" in graph and "warpopt.checkpoint" in graph


def test_a_warp_with_batchnorm_replays_exactly_and_its_live_buffers_are_never_written_by_the_replay():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = warpopt.warp(net, layer=warpopt.ConvBNWarp)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 1, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(3)]
    with opt.task(data, nn.functional.cross_entropy) as task:
        for x, y in task:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    live = {n: b.clone() for n, b in model.named_warp_buffers()}
    assert live, "ConvBNWarp should bring BatchNorm buffers"
    warp = [p.detach().clone() for p in model.warp_parameters()]
    opt.meta_step()  # the exact objective (torch.func.grad) through a train-mode BatchNorm warp
    assert any(not torch.equal(a, b) for a, b in zip(warp, model.warp_parameters()))
    for n, b in model.named_warp_buffers():
        assert torch.equal(b, live[n]), n
