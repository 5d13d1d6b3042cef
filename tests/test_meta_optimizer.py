"""WarpGradMetaOptimizer: the torch.optim contract, θ0 learners, algorithms and faults."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import warpopt
from warpopt.task_optimizers import functional_step_for

DTYPE = torch.float64


def make_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)).to(DTYPE)
    return warpopt.warp(net)


def make_tasks(n=2, batches=3, seed=0):
    """Deterministic regression tasks: each is a fixed list of (x, y) batches."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        w = torch.randn(3, 1, generator=g, dtype=DTYPE)
        data = []
        for _ in range(batches):
            x = torch.randn(6, 3, generator=g, dtype=DTYPE)
            data.append((x, torch.sin(x @ w)))
        tasks.append(data)
    return tasks


loss_fn = nn.functional.mse_loss


def adapt(opt, model, tasks, steps=None):
    for data in tasks:
        with opt.task(data, loss_fn):
            for x, y in (data if steps is None else [data[i % len(data)] for i in range(steps)]):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()


def snapshot(opt, model):
    return {"model": copy.deepcopy(model.state_dict()), "theta0": [t.detach().clone() for t in opt.theta0],
            "buffer": len(opt.replay)}


def same(a, b):
    return (a["buffer"] == b["buffer"] and all(torch.equal(x, y) for x, y in zip(a["theta0"], b["theta0"]))
            and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]))


def test_two_line_loop_updates_warp_and_initialisation():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-2)
    warp_before = [p.detach().clone() for p in model.warp_parameters()]
    theta0_before = [t.detach().clone() for t in opt.theta0]
    adapt(opt, model, make_tasks())
    assert len(opt.replay) == 2 * 4  # θ_0..θ_K for K = 3 steps, 2 tasks
    stats = opt.meta_step()
    assert stats["warp_updates"] == 8 and len(opt.replay) == 0
    assert all(not torch.equal(a, b) for a, b in zip(warp_before, model.warp_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(theta0_before, opt.theta0))


def test_task_start_resets_adapt_parameters_to_theta0_and_freezes_warp():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    tasks = make_tasks()
    adapt(opt, model, tasks[:1])
    with opt.task(tasks[1], loss_fn):
        assert all(torch.equal(p, t) for p, t in zip(model.adapt_parameters(), opt.theta0))
        assert not any(p.requires_grad for p in model.warp_parameters())
    assert all(p.requires_grad for p in model.warp_parameters())


def test_param_groups_are_the_task_optimizers_and_schedulers_change_the_task_lr():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.task_optimizer.param_groups
    assert opt.param_groups[0]["momentum"] == 0.9
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = make_tasks(1)[0]
    x, y = data[0]
    with opt.task(data, loss_fn):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        before = [p.detach().clone() for p in model.adapt_parameters()]
        grads = [p.grad.clone() for p in model.adapt_parameters()]
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.task_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    for b, g, p in zip(before, grads, model.adapt_parameters()):  # the step used lr 0.1
        assert torch.allclose(p, b - 0.1 * g)


def test_step_hooks_return_removable_handles():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    calls = []
    h1 = opt.register_step_post_hook(lambda o, a, k: calls.append("step"))
    h2 = opt.register_meta_step_post_hook(lambda o, stats: calls.append("meta"))
    adapt(opt, model, make_tasks(1))
    opt.meta_step()
    assert calls == ["step"] * 3 + ["meta"]
    h1.remove(), h2.remove()
    adapt(opt, model, make_tasks(1))
    opt.meta_step()
    assert calls == ["step"] * 3 + ["meta"]


@pytest.mark.parametrize("algorithm", [warpopt.offline, warpopt.online])
def test_state_dict_round_trip_continues_bit_identically(algorithm):
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, momentum=0.5, algorithm=algorithm())
    tasks = make_tasks(3)
    adapt(opt, model, tasks[:2])
    opt.meta_step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    model2 = make_model(seed=1)
    opt2 = warpopt.WarpGradMetaOptimizer(model2, lr=0.3, momentum=0.5, algorithm=algorithm())
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for o, m in ((opt, model), (opt2, model2)):
        adapt(o, m, tasks[1:])
        o.meta_step()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(opt.theta0, opt2.theta0):
        assert torch.equal(a, b)
    assert opt.counters == opt2.counters


def _explicit_leap_gradient(model, theta0, data, lr, steps):
    """Eq. 13 computed by hand with plain loops."""
    params = list(model.adapt_parameters())
    with torch.no_grad():
        for p, t in zip(params, theta0):
            p.copy_(t)
    x, y = data[0]
    total = [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        loss_prev = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss_prev, params)
        with torch.no_grad():
            prev = [p.clone() for p in params]
            for p, g in zip(params, grads):
                p.sub_(lr * g)
            loss = loss_fn(model(x), y)
            dl = loss - loss_prev
            dtheta = [p - q for p, q in zip(params, prev)]
            norm = torch.sqrt(sum(d.pow(2).sum() for d in dtheta) + dl ** 2)
            for acc, g, d in zip(total, grads, dtheta):
                acc.sub_((dl * g + d) / norm)
    return total


def test_leap_gradient_matches_eq13():
    model = make_model()
    data = make_tasks(1, batches=1)[0]  # one batch: the probe batch is the training batch
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=0.0, init_lr=1.0, objective=warpopt.approx,
                                        meta_optimizer=torch.optim.SGD, initialisation=warpopt.leap(loss="probe"))
    theta0 = [t.detach().clone() for t in opt.theta0]
    adapt(opt, model, [data], steps=4)
    opt.meta_step()
    expected = _explicit_leap_gradient(model, theta0, data, 0.1, 4)
    for t_new, t_old, g in zip(opt.theta0, theta0, expected):
        assert torch.allclose(t_old - t_new, g, atol=1e-12)


def _explicit_leap_train_gradient(model, theta0, batches, lr):
    """Eq. 13 by hand with the training losses of consecutive steps (Leap's own implementation):
    segment k (θ_{k-1} → θ_k) uses L(θ_k) on batch k, L(θ_{k-1}) on batch k-1, ∇L(θ_{k-1})."""
    params = list(model.adapt_parameters())
    with torch.no_grad():
        for p, t in zip(params, theta0):
            p.copy_(t)
    total = [torch.zeros_like(p) for p in params]
    prev = None
    for x, y in batches:
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            if prev is not None:
                prev_params, prev_grads, prev_loss = prev
                dl = loss - prev_loss
                dtheta = [p - q for p, q in zip(params, prev_params)]
                norm = torch.sqrt(sum(d.pow(2).sum() for d in dtheta) + dl ** 2)
                for acc, g, d in zip(total, prev_grads, dtheta):
                    acc.sub_((dl * g + d) / norm)
            prev = ([p.clone() for p in params], grads, loss.detach())
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return total


@pytest.mark.parametrize("how", ["forward", "closure", "one_shot_through_the_task"])
def test_leap_train_loss_gradient_matches_eq13(how):
    """leap(loss="train"): ΔL from the loop's own losses on its (different) batches, no probe."""
    model = make_model()
    data = make_tasks(1, batches=4)[0]
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=0.0, init_lr=1.0, meta_optimizer=torch.optim.SGD,
                                        algorithm=warpopt.algorithms.Algorithm(),  # θ0 only: nothing replayed
                                        initialisation=warpopt.leap(loss="train"))
    theta0 = [t.detach().clone() for t in opt.theta0]
    with opt.task(data if how != "one_shot_through_the_task" else iter(data), loss_fn) as task:
        for x, y in (task if how == "one_shot_through_the_task" else data):
            if how == "closure":
                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    opt.meta_step()
    expected = _explicit_leap_train_gradient(model, theta0, data, 0.1)
    assert sum(e.abs().sum() for e in expected) > 1e-3  # K - 1 = 3 segments with a loss term
    for t_new, t_old, g in zip(opt.theta0, theta0, expected):
        assert torch.allclose(t_old - t_new, g, atol=1e-12)


def test_leap_train_loss_costs_no_forward_and_probe_costs_one_per_step():
    """The training loss is read off the loop's forward; the probe runs one more per step."""
    calls = {}
    for loss in ("train", "probe"):
        model = make_model()
        data = make_tasks(1, batches=3)[0]
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.leap(loss=loss),
                                            algorithm=warpopt.algorithms.Algorithm())
        count = [0]
        handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        with opt.task(data, loss_fn):
            for x, y in data:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        handle.remove()
        calls[loss] = count[0]
    assert calls == {"train": 3, "probe": 3 + 1 + 3}  # probe: L(θ_0) once, then one per step


class _Loader:
    """A re-iterable source that is not a sequence (like a DataLoader)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_leap_falls_back_to_the_probe_when_the_loops_batches_are_unknown():
    """A loader the loop iterates by itself (no closure): the task takes ΔL on a probe batch, as
    leap(loss="probe") does; a loss that goes missing after the first step is an error that says
    what to do, and the task is rolled back."""
    data = make_tasks(1, batches=3)[0]
    moved = {}
    for loss in ("train", "probe"):
        model = make_model()
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=0.0, init_lr=1.0, meta_optimizer=torch.optim.SGD,
                                            algorithm=warpopt.algorithms.Algorithm(),
                                            initialisation=warpopt.leap(loss=loss))
        theta0 = [t.detach().clone() for t in opt.theta0]
        loader = _Loader(data)
        with opt.task(loader, loss_fn):
            for x, y in loader:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        opt.meta_step()
        moved[loss] = [a - b for a, b in zip(theta0, opt.theta0)]
    assert sum(m.abs().sum() for m in moved["train"]) > 1e-3
    for a, b in zip(moved["train"], moved["probe"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.leap())
    with pytest.raises(ValueError, match="iterate the task"):
        with opt.task(_Loader(data), loss_fn) as task:
            for k, (x, y) in enumerate(task):  # batches 0, 1 seen through the task ...
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
                if k == 1:
                    break
            x, y = data[2]  # ... batch 2 not
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert opt.counters["tasks"] == 0
    assert all(torch.equal(p, t) for p, t in zip(model.adapt_parameters(), opt.theta0))
    with pytest.raises(ValueError, match="loss"):
        warpopt.leap(loss="test")


def test_maml_gradient_matches_finite_differences():
    model = make_model()
    support, query = make_tasks(1, batches=2)[0]
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.2, meta_lr=0.0, init_lr=1.0, objective=warpopt.approx,
                                        meta_optimizer=torch.optim.SGD, initialisation=warpopt.maml())
    theta0 = [t.detach().clone() for t in opt.theta0]
    with opt.task(lambda k: support, loss_fn, meta_data=lambda k: query):
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model(support[0]), support[1]).backward()
            opt.step()
    opt.meta_step()
    maml_grad = [a - b for a, b in zip(theta0, opt.theta0)]

    params = list(model.adapt_parameters())

    def maml_loss():
        with torch.no_grad():
            for p, t in zip(params, probe):
                p.copy_(t)
        with torch.enable_grad():
            for _ in range(3):
                grads = torch.autograd.grad(loss_fn(model(support[0]), support[1]), params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(0.2 * g)
        with torch.no_grad():
            return loss_fn(model(query[0]), query[1])

    probe = [t.clone() for t in theta0]
    eps = 1e-6
    for i, t in enumerate(probe):
        flat = t.view(-1)
        for j in range(flat.numel()):
            orig = flat[j].item()
            flat[j] = orig + eps
            up = maml_loss()
            flat[j] = orig - eps
            down = maml_loss()
            flat[j] = orig
            fd = (up - down) / (2 * eps)
            assert abs(fd - maml_grad[i].view(-1)[j]) <= 1e-6 * max(1.0, abs(fd))


def test_reptile_and_fomaml_contributions():
    model = make_model()
    data = make_tasks(1)[0]
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=0.0, init_lr=1.0, objective=warpopt.approx,
                                        meta_optimizer=torch.optim.SGD, initialisation=warpopt.reptile())
    theta0 = [t.detach().clone() for t in opt.theta0]
    adapt(opt, model, [data])
    final = [p.detach().clone() for p in model.adapt_parameters()]
    opt.meta_step()
    for t, f in zip(opt.theta0, final):  # θ0 ← θ0 − (θ0 − θ_K) = θ_K
        assert torch.allclose(t, f)


def test_online_algorithm_accumulates_one_update_per_meta_batch():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, algorithm=warpopt.online())
    adapt(opt, model, make_tasks(2))
    assert len(opt.replay) == 0
    stats = opt.meta_step()
    assert stats["warp_updates"] == 1


def test_continual_harvest_is_eq8_on_the_next_batch():
    """Algorithm 3 with objective=None: φ's meta-gradient is ∇φ L_task at θ_{k+1}, next batch."""
    model = make_model()
    data = make_tasks(1, batches=2)[0]
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1.0, meta_optimizer=torch.optim.SGD,
                                        algorithm=warpopt.continual(every=2), initialisation=warpopt.none())
    phi0 = [p.detach().clone() for p in model.warp_parameters()]
    expected = [torch.zeros_like(p) for p in phi0]
    for x, y in data:
        opt.zero_grad()  # zeroes the adapt gradients only: φ.grad accumulates along the stream
        params = [p.detach().clone() for p in model.adapt_parameters()]
        with torch.enable_grad():  # the same loss, computed independently at the live θ
            phi = [p.detach().clone().requires_grad_() for p in model.warp_parameters()]
            names = [n for n, _ in model.named_warp_parameters()]
            out = torch.func.functional_call(model, dict(zip(names, phi)), (x,))
            for e, g in zip(expected, torch.autograd.grad(loss_fn(out, y), phi)):
                e.add_(g / 2)
        loss_fn(model(x), y).backward()
        opt.step()
    for p, p0, e in zip(model.warp_parameters(), phi0, expected):
        assert torch.allclose(p, p0 - e)


def test_replay_buffer_options():
    model = make_model()
    buffer = warpopt.ReplayBuffer(capacity=5, every=2, dtype=torch.float32, storage=warpopt.CPUStorage())
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, replay=buffer, momentum=0.9)
    adapt(opt, model, make_tasks(3, batches=4))
    assert len(buffer) == 5  # 3 tasks × (θ0, θ2, θ4) = 9 offered, 5 kept
    sample = buffer.sample(0, torch.device("cpu"))
    assert sample.params[0].dtype == DTYPE and sample.step % 2 == 0
    if sample.step > 0:
        assert set(sample.states[0]) == {"momentum_buffer"}
    opt.meta_step()


def test_disk_storage_round_trips_points(tmp_path):
    model = make_model()
    buffer = warpopt.ReplayBuffer(storage=warpopt.DiskStorage(str(tmp_path)))
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, replay=buffer, task_optimizer=torch.optim.Adam)
    data = make_tasks(1)[0]
    adapt(opt, model, [data])
    last = buffer.sample(len(buffer) - 1, torch.device("cpu"))
    (private,) = tmp_path.iterdir()  # the storage's own subdirectory
    assert last.step == 3 and buffer.nbytes() == 0 and len(list(private.iterdir())) == 4
    for p, q in zip(last.params, model.adapt_parameters()):
        assert torch.equal(p, q)
    assert float(last.states[0]["step"]) == 3.0
    opt.meta_step()
    assert not list(tmp_path.iterdir())


def test_host_step_counts_are_recorded_on_the_host_and_replayed_exactly():
    # torch.optim keeps Adam's step count on the CPU; recording must not move it to the
    # parameters' device (a synchronisation per step on a GPU) nor round it (half storage).
    model = make_model()
    buffer = warpopt.ReplayBuffer(dtype=torch.float16)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, replay=buffer, task_optimizer=torch.optim.Adam)
    adapt(opt, model, make_tasks(1, batches=3))
    n_params = len(list(model.adapt_parameters()))
    for index in range(len(buffer)):
        point = buffer._points[index][1]
        sample = buffer.sample(index, torch.device("cpu"))
        assert point.host == (float(sample.step),) * (n_params if sample.step else 0)
        assert point.layout.dtypes == (torch.float16,)  # no step count went to a device-side vector
        for state in sample.states if sample.step else ():
            assert state["step"].device.type == "cpu" and float(state["step"]) == sample.step
    live = opt.task_optimizer.state[next(model.adapt_parameters())]["step"]
    assert float(live) == 3.0  # reading the live counter did not alias or change it


# ---------------------------------------------------------------- bad input and faults
def test_meta_step_with_empty_buffer_raises_and_changes_nothing():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    before = snapshot(opt, model)
    with pytest.raises(RuntimeError, match="replay buffer is empty"):
        opt.meta_step()
    assert same(before, snapshot(opt, model))


def _nan_task_loop(opt, model, data):
    with opt.task(data, loss_fn):
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = loss_fn(model(x), y) * (float("nan") if i == 1 else 1.0)
            loss.backward()
            opt.step()


def test_nan_loss_raises_and_leaves_everything_as_it_was():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    tasks = make_tasks(2)
    adapt(opt, model, tasks[:1])
    before = snapshot(opt, model)
    with pytest.raises(FloatingPointError, match="NaN"):
        _nan_task_loop(opt, model, tasks[1])
    assert same(before, snapshot(opt, model))
    opt.meta_step()  # the earlier task is still there and usable


def test_nan_loss_skip_policy_warns_and_drops_the_task():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, on_nonfinite="skip")
    tasks = make_tasks(2)
    adapt(opt, model, tasks[:1])
    before = snapshot(opt, model)
    with pytest.warns(RuntimeWarning, match="dropped"):
        _nan_task_loop(opt, model, tasks[1])
    assert same(before, snapshot(opt, model))


def test_parameter_not_in_the_model_is_rejected():
    model = make_model()
    stranger = nn.Parameter(torch.zeros(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="not an adapt parameter"):
        warpopt.WarpGradMetaOptimizer(model, params=[stranger], lr=0.1)
    with pytest.raises(ValueError, match="not an adapt parameter"):
        warpopt.WarpGradMetaOptimizer(model, params=list(model.warp_parameters()), lr=0.1)


def test_exact_objective_with_a_non_differentiable_optimizer_is_rejected():
    model = make_model()
    with pytest.raises(TypeError, match="LBFGS"):
        warpopt.WarpGradMetaOptimizer(model, lr=0.1, task_optimizer=torch.optim.LBFGS)


def test_nothing_to_meta_learn_and_nested_tasks_are_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        warpopt.WarpGradMetaOptimizer([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="nothing to meta-learn.*warp"):  # no φ and a fixed θ0
        warpopt.WarpGradMetaOptimizer(nn.Linear(2, 2), lr=0.1, initialisation=warpopt.none())
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    data = make_tasks(1)[0]
    with opt.task(data, loss_fn):
        with pytest.raises(RuntimeError, match="nested"):
            with opt.task(data, loss_fn):
                pass
        with pytest.raises(RuntimeError, match="inside a task"):
            opt.meta_step()
    with pytest.raises(RuntimeError, match="outside a task"):
        opt.step()


def test_learn_false_adapts_without_recording_or_meta_learning():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, algorithm=warpopt.online())
    data = make_tasks(1)[0]
    with opt.task(data, loss_fn, learn=False):
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert len(opt.replay) == 0 and not opt.algorithm.pending(opt.algorithm_state)
    assert any(not torch.equal(p, t) for p, t in zip(model.adapt_parameters(), opt.theta0))
    with pytest.raises(RuntimeError, match="nothing to meta-learn"):
        opt.meta_step()


def test_meta_step_stats_are_per_step_with_running_counters():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    for expected_total in (8, 16):
        adapt(opt, model, make_tasks())
        stats = opt.meta_step()
        assert stats["warp_updates"] == 8
        assert stats["counters"]["warp_updates"] == expected_total


def test_copying_or_pickling_the_optimizer_says_to_use_state_dict():
    # torch.optim's __getstate__ kept only defaults/state/param_groups: deepcopy failed with
    # KeyError '_own_defaults' (and a full copy would share a DiskStorage directory).
    import pickle

    model = warpopt.warp(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    for attempt in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled.*state_dict\\(\\)"):
            attempt(opt)


def test_an_optimizer_given_a_model_with_a_warped_submodule_says_how_to_warp_it():
    # warp(model.encoder) then WarpGradMetaOptimizer(model): the outer model is not warped, so its
    # parameters were all taken for task parameters, warp layers included (adapted, never meta-learned).
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
            self.head = nn.Linear(5, 1)

        def forward(self, x):
            return self.head(self.encoder(x))

    model = Outer()
    warpopt.warp(model.encoder, where=nn.Linear)
    with pytest.raises(ValueError, match="submodule 'encoder' is.*where=\\['encoder.0', 'encoder.2'\\]"):
        warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    inner = [n for n, _ in model.encoder.named_warp_parameters()]
    warpopt.unwarp(model.encoder)
    warpopt.warp(model, where=["encoder.0", "encoder.2"])  # the advice, as given
    assert [n for n, _ in model.named_warp_parameters()] == ["encoder." + n for n in inner]


def test_continual_with_maml_in_the_loop_is_refused_and_the_replayed_maml_runs():
    # continual() updates φ inside step() (in place), while maml()'s in-loop trajectory holds φ in
    # its graph: the θ0 meta-gradient at the task's end failed with autograd's in-place error.
    model = make_model()
    with pytest.raises(ValueError, match=r"updates φ in place.*maml\(unroll='replay'\)"):
        warpopt.WarpGradMetaOptimizer(model, lr=0.1, algorithm=warpopt.continual(every=2),
                                      initialisation=warpopt.maml())
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, algorithm=warpopt.continual(every=2),
                                        initialisation=warpopt.maml(unroll="replay"))
    adapt(opt, model, make_tasks(2, batches=3))
    assert opt.counters["warp_updates"] == 3
    opt.meta_step()
    assert all(torch.isfinite(t).all() for t in opt.theta0)
