"""Issue 14, item 5: the step replayed is the step taken. Per-step hyper-parameters (schedulers)
and gradient clipping are recorded with each point and replayed (differentiably); any other
change to the step is detected and reported once."""
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import warpopt
from warpopt.objectives import meta_gradient, with_batches
from warpopt.step_hypers import StepHypers

from finite_differences import central_differences, relative_error

DTYPE = torch.float64
loss_fn = nn.functional.mse_loss
CPU = torch.device("cpu")


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return warpopt.warp(nn.Sequential(*layers, nn.Linear(6, 1)).to(DTYPE))


def batches(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g, dtype=DTYPE)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, generator=g, dtype=DTYPE)
        out.append((x, torch.sin(3 * x @ w)))
    return out


def replayed_steps(opt, data):
    """For each recorded θ_k (k < K) of the buffer's one task: U replayed on the loop's batch k
    (the replay's own update path, ``ReplayContext.update``) and the recorded θ_{k+1}."""
    ctx = opt.replay_context()
    samples = [opt.replay.sample(i, CPU) for i in range(len(opt.replay))]
    pairs = []
    for s, nxt in zip(samples, samples[1:]):
        s = with_batches(type(s)(**{**s.__dict__, "task_batch": data[s.step], "meta_batch": data[s.step]}))
        with torch.no_grad():
            pairs.append((ctx.update(s, list(s.params)), nxt.params, s))
    return pairs


def assert_replayed_equals_recorded(pairs, atol=1e-12):
    for replayed, recorded, s in pairs:
        for a, b in zip(replayed, recorded):
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"step {s.step}")


@pytest.mark.parametrize("task_optimizer", ["sgd_momentum", "adam"])
def test_a_scheduler_mid_task_is_replayed_step_by_step(task_optimizer):
    model = make_model()
    kwargs = dict(task_optimizer=torch.optim.SGD, momentum=0.9) if task_optimizer == "sgd_momentum" else dict(
        task_optimizer=torch.optim.Adam)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))  # a new lr every step
    data = batches(1)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the step check finds nothing to report
        with opt.task(data, loss_fn) as task:
            for k, (x, y) in enumerate(task):
                if task_optimizer == "adam":  # β1 changed by hand, mid task, also recorded
                    opt.param_groups[0]["betas"] = (0.9 - 0.1 * k, 0.999)
                lrs.append(opt.param_groups[0]["lr"])
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
                scheduler.step()
    pairs = replayed_steps(opt, data)
    assert len(pairs) == 5
    assert [dict(s.hypers.groups[0])["lr"] for _, _, s in pairs] == lrs
    assert_replayed_equals_recorded(pairs)
    # The test can fail: replayed with the param groups as they are now (the old behaviour),
    # the steps land elsewhere.
    ctx = opt.replay_context()
    _, recorded, s = pairs[0]
    stale = type(s)(**{**s.__dict__, "hypers": None})
    with torch.no_grad():
        moved = ctx.update(stale, list(stale.params))
    assert max((a - b).abs().max() for a, b in zip(moved, recorded)) > 1e-3
    opt.meta_step()


def test_clipping_by_norm_is_replayed_where_it_clipped_and_where_it_did_not():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.2, momentum=0.5)
    data = batches(2)
    norms = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.task(data, loss_fn) as task:
            for k, (x, y) in enumerate(task):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                norms.append(float(opt.clip_grad_norm_(max_norm=0.3 if k % 2 == 0 else 1e6)))
                opt.step()
    assert any(n > 0.3 for n in norms[::2])  # some steps were clipped ...
    pairs = replayed_steps(opt, data)
    assert [s.hypers.clip for _, _, s in pairs] == [(0.3, 2.0) if k % 2 == 0 else (1e6, 2.0) for k in range(5)]
    assert_replayed_equals_recorded(pairs)  # ... and every step replays exactly
    assert opt.replay.sample(5, CPU).hypers.clip is None  # θ_K: no step taken from it yet
    opt.meta_step()


@pytest.mark.parametrize("algorithm", ["online", "offline"])
def test_the_exact_meta_gradient_through_clipping_matches_finite_differences(algorithm):
    """L(φ) = L_meta(θ0 − α c(φ) g(φ)), c = min(1, m / (‖g‖ + 1e-6)), clipping active."""
    model = make_model(3)
    batch, meta_batch = batches(4, n=2)
    theta0 = [p.detach().clone() for p in model.adapt_parameters()]
    g = torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), list(model.adapt_parameters()))
    max_norm, lr = 0.4 * float(torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))), 0.3
    alg = warpopt.online() if algorithm == "online" else warpopt.offline()
    replay = warpopt.ReplayBuffer(include_final=False)  # offline: only θ_0 is replayed
    opt = warpopt.WarpGradMetaOptimizer(model, lr=lr, algorithm=alg, initialisation=warpopt.none(),
                                        meta_optimizer=torch.optim.SGD, meta_lr=1.0, replay=replay)
    phi = [p.detach().clone() for p in model.warp_parameters()]
    with opt.task(lambda k: batch, loss_fn, meta_data=lambda k: meta_batch):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        assert float(opt.clip_grad_norm_(max_norm)) > max_norm
        opt.step()
    opt.meta_step()
    analytic = [a - b for a, b in zip(phi, model.warp_parameters())]

    phi_names = [n for n, _ in model.named_warp_parameters()]
    theta_names = [n for n, _ in model.named_adapt_parameters()]

    def value(phi_values):
        theta = [t.clone().requires_grad_(True) for t in theta0]

        def at(params, x):
            return functional_call(model, {**dict(zip(phi_names, phi_values)), **dict(zip(theta_names, params))}, (x,))

        grads = torch.autograd.grad(loss_fn(at(theta, batch[0]), batch[1]), theta)
        norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in grads]))
        c = min(1.0, max_norm / (float(norm) + 1e-6))
        stepped = [t.detach() - lr * c * gr for t, gr in zip(theta, grads)]
        with torch.no_grad():
            return loss_fn(at(stepped, meta_batch[0]), meta_batch[1]).item()

    numeric = central_differences(value, phi)
    assert relative_error(analytic, numeric) < 1e-6
    # The clip factor carries φ-dependence: without it (plain Eq. 7) the gradient differs.
    ctx = opt.replay_context()
    sample = warpopt.Sample(warpopt.Task(lambda k: batch, loss_fn, meta_data=lambda k: meta_batch), 0, 0, theta0,
                            [{} for _ in theta0], [], batch, meta_batch,
                            hypers=StepHypers(((("lr", lr),),), (max_norm, 2.0)))
    with torch.no_grad():
        for p, v in zip(model.warp_parameters(), phi):
            p.copy_(v)
    clipped, _ = meta_gradient(warpopt.exact, ctx, [sample], list(model.warp_parameters()))
    assert relative_error(clipped, numeric) < 1e-6  # the same, through the public pieces
    unclipped, _ = meta_gradient(warpopt.exact, ctx, [type(sample)(**{**sample.__dict__, "hypers": None})],
                                 list(model.warp_parameters()))
    assert relative_error(unclipped, numeric) > 1e-2


def run_task(opt, model, data, modify=None, through_task=True):
    source = data if through_task else (lambda k: data[k % len(data)])
    with opt.task(source, loss_fn) as task:
        loop = task if through_task else data
        for x, y in loop:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            if modify == "regulariser":
                loss = loss + 0.1 * sum(p.pow(2).sum() for p in model.adapt_parameters())
            loss.backward()
            if modify == "scale":
                for p in model.adapt_parameters():
                    p.grad.mul_(0.5)
            elif modify == "torch_clip":
                torch.nn.utils.clip_grad_norm_(model.adapt_parameters(), 1e-3)
            opt.step()
            if modify == "constraint":
                with torch.no_grad():
                    for p in model.adapt_parameters():
                        p.clamp_(-0.05, 0.05)


@pytest.mark.parametrize("modify, through_task, match", [
    ("scale", True, "changed between backward\\(\\) and step\\(\\).*opt.clip_grad_norm_"),
    ("scale", False, "changed between backward\\(\\) and step\\(\\).*opt.clip_grad_norm_"),
    ("torch_clip", False, "changed between backward\\(\\) and step\\(\\).*opt.clip_grad_norm_"),
    ("regulariser", True, "loop's loss is not the task's loss"),
    ("constraint", True, "parameters changed after step\\(\\)"),
])
def test_a_change_to_the_step_the_replay_cannot_see_is_reported_once(modify, through_task, match):
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    with pytest.warns(RuntimeWarning, match="step replayed is not the step taken.*" + match) as record:
        run_task(opt, model, batches(1), modify, through_task)
        run_task(opt, model, batches(2), modify, through_task)  # task 1 is checked too: no second warning
    assert sum("step replayed" in str(w.message) for w in record) == 1



@pytest.mark.parametrize("through_task", [True, False])
def test_gradients_changed_by_hand_only_from_a_later_step_on_are_reported(through_task):
    # A clean first step used to end the check (clipping once a condition holds went unseen); the
    # gradients' version counters stay watched for the rest of a checked task (free).
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    data = batches(1)
    with pytest.warns(RuntimeWarning, match="changed between backward\\(\\) and step\\(\\) at step 2") as record:
        with opt.task(data if through_task else (lambda k: data[k]), loss_fn) as task:
            for k, (x, y) in enumerate(task if through_task else data):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                if k >= 2:
                    torch.nn.utils.clip_grad_norm_(model.adapt_parameters(), 1e-3)
                opt.step()
    assert sum("step replayed" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_plain_loop_gets_no_warning_dropout_included(dropout):
    model = make_model(dropout=dropout)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none())  # (Leap's probe draws dropout)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_task(opt, model, batches(1))  # checked: task 0 ...
        run_task(opt, model, batches(2), through_task=False)  # ... and task 1
    after_tasks = torch.get_rng_state()
    opt.meta_step()
    # The check's recomputations ran under a forked RNG: the global stream is the loop's own
    # (10 forwards, as a plain loop takes them).
    torch.manual_seed(5)
    for data in (batches(1), batches(2)):
        for x, _ in data:
            model(x)
    assert torch.equal(torch.get_rng_state(), after_tasks)



@pytest.mark.parametrize("initialisation", ["leap", "fomaml", "maml", "multitask"])
def test_a_frozen_parameter_is_neither_replayed_nor_meta_learned(initialisation):
    # torch.optim never steps a parameter without a gradient. It was an adapt parameter all the
    # same: the replay stepped it (a different step from the one taken) and θ0 learners moved it.
    model = make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    value = frozen.detach().clone()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.3, initialisation=getattr(warpopt, initialisation)(), meta_lr=0.1)
    assert all(p is not frozen for g in opt.param_groups for p in g["params"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the step check finds the replayed step is the step taken
        for seed in (1, 2):
            with opt.task(batches(seed), loss_fn) as task:
                for x, y in task:
                    opt.zero_grad()
                    loss_fn(model(x), y).backward()
                    opt.step()
            opt.meta_step()
    assert torch.equal(frozen, value)
    with pytest.raises(ValueError, match="frozen"):
        warpopt.WarpGradMetaOptimizer(model, lr=0.1, params=[frozen])


def test_the_exact_meta_gradient_holds_a_frozen_parameter_fixed():
    model = make_model()
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        for p in model.warp_parameters():
            p.add_(0.3 * torch.randn_like(p))
    (x, y), (mx, my) = batches(3, n=2)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.3, algorithm=warpopt.online(), initialisation=warpopt.none(),
                                        meta_optimizer=torch.optim.SGD, meta_lr=1.0)
    phi = [p.detach().clone() for p in model.warp_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_adapt_parameters()}
    with opt.task(lambda k: (x, y), loss_fn, meta_data=lambda k: (mx, my)):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.meta_step()
    got = [a - b for a, b in zip(phi, model.warp_parameters())]
    names = [n for n, _ in model.named_warp_parameters()]
    trained = [n for n in theta if n != "0.weight"]

    def objective(point):  # one SGD step of the trained parameters only, by hand
        t = [theta[n].clone().requires_grad_(True) for n in trained]
        at = lambda ps, inp: functional_call(model, {**theta, **dict(zip(names, point)), **dict(zip(trained, ps))},  # noqa: E731
                                             (inp,))
        g = torch.autograd.grad(loss_fn(at(t, x), y), t)
        with torch.no_grad():
            return loss_fn(at([a - 0.3 * b for a, b in zip(t, g)], mx), my).item()

    assert relative_error(got, central_differences(objective, phi)) <= 1e-6


def test_clip_grad_norm_refuses_bad_bounds_before_touching_the_gradients():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    x, y = batches(1)[0]
    loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.adapt_parameters()]
    for bad in (-1.0, float("nan"), "a"):
        with pytest.raises((ValueError, TypeError), match="max_norm"):
            opt.clip_grad_norm_(bad)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.adapt_parameters(), grads))


def test_a_check_that_fails_warns_and_never_stops_training():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none())

    def fragile(forward, batch):  # a task loss that fails outside the loop (which computes its own)
        raise RuntimeError("fragile loss")

    data = batches(1, n=1)
    with pytest.warns(RuntimeWarning, match="could not check.*fragile loss.*training is unaffected"):
        with opt.task(data, batch_loss=fragile) as task:
            for x, y in task:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    assert opt.counters["tasks"] == 1 and len(opt.replay) == 2


def test_a_loss_that_is_not_a_scalar_is_refused_with_what_to_do():
    # reduction="none": Leap's ΔL failed with "The size of tensor a (6) must match the size of tensor b (4)".
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    theta = [p.detach().clone() for p in model.parameters()]
    per_example = functools.partial(loss_fn, reduction="none")
    with pytest.raises(ValueError, match="loss must be a scalar tensor.*got \\(4, 1\\)"):
        with opt.task(batches(1), per_example) as task:
            for x, y in task:
                opt.zero_grad()
                per_example(model(x), y).mean().backward()
                opt.step()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta)) and len(opt.replay) == 0


@pytest.mark.parametrize("initialisation", ["none", "fomaml", "maml"])
def test_the_replay_runs_the_model_in_the_train_eval_modes_the_loop_ran_in(initialisation):
    # BatchNorm normalises with batch statistics in train mode and running ones in eval mode: the
    # replay ran in whatever mode the model was in at meta_step() (or at the task's end), silently
    # another step than the one taken.
    def run(switch):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
        model = warpopt.warp(net.to(DTYPE))
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.3, initialisation=getattr(warpopt, initialisation)(),
                                            meta_optimizer=torch.optim.SGD, meta_lr=1.0)
        with opt.task(batches(1), loss_fn) as task:
            for x, y in task:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            if switch:
                model.eval()  # e.g. to evaluate the adapted model, inside the task or after it
        opt.meta_step()
        assert model.training != switch  # the user's mode is left as the user set it
        return torch.cat([p.detach().reshape(-1) for p in list(model.warp_parameters()) + list(opt.theta0)])

    torch.testing.assert_close(run(switch=True), run(switch=False), rtol=0, atol=0)
