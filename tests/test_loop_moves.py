"""Issue 14, items 6-8: models that move after the optimizer is built, checkpoints anywhere
between tasks (resumed bit-identically in a fresh process), autocast and torch.compile."""
import copy
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import warpopt
from warpopt.objectives import meta_gradient, with_batches

import resume_run

loss_fn = nn.functional.mse_loss
CPU = torch.device("cpu")


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).to(dtype)
    return warpopt.warp(net)


def batches(seed, n=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g, dtype=dtype)
    out = []
    for _ in range(n):
        x = torch.randn(5, 3, generator=g, dtype=dtype)
        out.append((x, torch.sin(x @ w)))
    return out


def adapt(opt, model, data, forward=None):
    forward = forward or model
    with opt.task(data, loss_fn) as task:
        for x, y in task:
            opt.zero_grad()
            loss_fn(forward(x), y).backward()
            opt.step()


# ---------------------------------------------------------------------------------- item 6
def test_model_double_after_construction_moves_theta0_states_and_learned_hypers():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, learn_lr=True)
    adapt(opt, model, batches(1))
    opt.meta_step()  # Adam states for φ, θ0 and the learned lr exist, in float32
    model.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapt(opt, model, batches(2, dtype=torch.float64))
        stats = opt.meta_step()
    assert stats["warp_updates"] == 5 and all(torch.isfinite(p).all() for p in model.parameters())
    assert all(t.dtype == torch.float64 for t in opt.theta0)
    for optimizer in (opt.meta_optimizer, opt.init_optimizer):
        for p, state in optimizer.state.items():
            assert state["exp_avg"].dtype == p.dtype and state["exp_avg_sq"].dtype == p.dtype
    assert all(p.dtype == torch.float64 for p in model.warp_parameters())
    assert opt.state_dict()["config"]["theta0"][0][1] == "torch.float64"


def test_a_move_while_the_meta_batch_is_pending_is_refused_and_changes_nothing():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    adapt(opt, model, batches(1))
    model.double()
    with pytest.raises(RuntimeError, match="call meta_step\\(\\) before moving the model"):
        opt.meta_step()
    assert len(opt.replay) == 5 and all(t.dtype == torch.float32 for t in opt.theta0)
    model.float()  # moved back: the meta-batch goes on
    opt.meta_step()



@pytest.mark.parametrize("initialisation", ["leap", "maml"])
def test_a_move_inside_a_task_is_refused_with_what_to_do_and_rolled_back(initialisation):
    # It failed inside the library's own forwards with "mat1 and mat2 must have the same dtype".
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=getattr(warpopt, initialisation)())
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="moved .* inside a task.*Move the model between tasks"):
        with opt.task(batches(1), loss_fn) as task:
            for k, (x, y) in enumerate(task):
                if k == 1:
                    model.double()
                    x, y = x.double(), y.double()
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    assert all(torch.equal(p, t.double()) for p, t in zip(model.parameters(), theta))  # rolled back
    assert len(opt.replay) == 0 and opt.counters["tasks"] == 0
    adapt(opt, model, batches(2, dtype=torch.float64))  # between tasks the move is followed
    assert opt.meta_step()["warp_updates"] > 0 and all(t.dtype == torch.float64 for t in opt.theta0)



def test_a_float16_model_whose_adam_meta_update_overflows_is_told_why():
    # torch.optim.Adam's eps=1e-8 is 0 in float16: a zero second moment gives 0/0 in φ or θ0.
    # The error named only losses and learning rates; it says what to change now, and that works.
    import functools

    for meta_optimizer, fails in ((torch.optim.Adam, True), (functools.partial(torch.optim.Adam, eps=1e-4), False)):
        model = make_model()
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_optimizer=meta_optimizer)
        model.half()
        adapt(opt, model, batches(1, dtype=torch.float16))
        if fails:
            with pytest.raises(FloatingPointError, match="float16.*eps=1e-8 rounds to 0.*eps=1e-4"):
                opt.meta_step()
        else:
            opt.meta_step()
            assert all(torch.isfinite(p).all() for p in model.parameters())


def test_replaced_parameters_are_refused_with_what_to_do():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()  # new Parameter objects: the optimizers hold stale ones
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    with pytest.raises(RuntimeError, match="build a new WarpGradMetaOptimizer.*load the old one's state_dict"):
        adapt(opt, model, batches(1, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_model_to_cuda_after_construction():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    adapt(opt, model, batches(1))
    opt.meta_step()
    model.cuda()
    adapt(opt, model, [(x.cuda(), y.cuda()) for x, y in batches(2)])
    opt.meta_step()
    assert all(t.is_cuda for t in opt.theta0)
    assert all(s["exp_avg"].is_cuda for s in opt.meta_optimizer.state.values())


# ---------------------------------------------------------------------------------- item 7
def test_a_mid_meta_batch_checkpoint_resumes_bit_identically_in_a_fresh_process(tmp_path):
    model, opt = resume_run.build()
    reference = resume_run.result(opt, model, resume_run.run(opt, model))

    model, opt = resume_run.build()
    stop = resume_run.META_BATCH + 2  # two tasks into the second meta-batch: a generator's and a list's
    first = resume_run.run(opt, model, stop=stop)
    assert len(opt.replay) > 0  # pending points
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(include_rng=True), "next_task": stop}, checkpoint)

    out = tmp_path / "result.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(warpopt.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(pathlib.Path(resume_run.__file__)), str(checkpoint), str(out)],
                   check=True, env=env, timeout=300)
    resumed = torch.load(out, weights_only=True)
    assert first + resumed["losses"] == reference["losses"]
    for key in ("phi", "theta0"):
        for a, b in zip(resumed[key], reference[key]):
            assert torch.equal(a, b), key  # bit-identical
    # The RNG state is what makes it so (dropout, Leap's probe, the replay): without it, not.
    resume_run.main([str(checkpoint), str(tmp_path / "no_rng.pt"), "--drop-rng"])
    dropped = torch.load(tmp_path / "no_rng.pt", weights_only=True)
    assert not all(torch.equal(a, b) for a, b in zip(dropped["phi"], reference["phi"]))


def test_a_pending_checkpoint_needs_its_tasks_back_and_is_validated_first():
    model, opt = resume_run.build()
    resume_run.run(opt, model, stop=2)
    sd = opt.state_dict()
    assert [t["kind"] for t in sd["pending"]["tasks"]] == ["one-shot", "iterable"]
    assert len(sd["pending"]["tasks"][0]["tape"]) == resume_run.STEPS  # the generator's batches, saved
    model2, opt2 = resume_run.build(seed=5)
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match="saved mid meta-batch: 2 adapted task.*tasks="):
        opt2.load_state_dict(sd)
    with pytest.raises(ValueError, match="expected 2 distinct"):
        opt2.load_state_dict(sd, tasks=[resume_run.reattach(0)])
    with pytest.raises(ValueError, match="tasks=\\[1\\] is named 'task 2', the pending task 1 was 'task 1'"):
        opt2.load_state_dict(sd, tasks=[resume_run.reattach(0), resume_run.reattach(2)])
    as_callable = warpopt.Task(lambda k: resume_run.task_data(1)[k], loss_fn, name="task 1")
    with pytest.raises(ValueError, match="saved with iterable data"):
        opt2.load_state_dict(sd, tasks=[resume_run.reattach(0), as_callable])
    bad = copy.deepcopy(sd)
    bad["pending"]["contents"]["points"][3]["params"][0] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="pending.points\\[3\\].params"):
        opt2.load_state_dict(bad, tasks=[resume_run.reattach(0), resume_run.reattach(1)])
    after = opt2.state_dict()
    assert len(opt2.replay) == 0 and after["pending"] is None
    for a, b in zip(after["theta0"], before["theta0"]):
        assert torch.equal(a, b)
    opt2.load_state_dict(sd, tasks=[resume_run.reattach(0), resume_run.reattach(1)])
    assert len(opt2.replay) == len(opt.replay)
    with opt.task(resume_run.task_data(9), loss_fn):
        assert opt.state_dict()["task_in_progress"]["steps"] == 0  # inside a task: saved in progress
        with pytest.raises(RuntimeError, match="load_state_dict\\(\\) inside a task"):
            opt.load_state_dict(sd, tasks=[resume_run.reattach(0), resume_run.reattach(1)])


# ---------------------------------------------------------------------------------- item 8
def test_a_task_loop_under_autocast_is_recorded_in_full_precision_and_replayed_in_it():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    data = batches(1)
    live = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bfloat16 rounding is no "step replayed" mismatch
        with opt.task(data, loss_fn) as task:
            for x, y in task:
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)
                    assert out.dtype == torch.bfloat16
                    loss = loss_fn(out.float(), y)
                loss.backward()
                opt.step()
                live.append([p.detach().clone() for p in model.adapt_parameters()])
    samples = [opt.replay.sample(i, CPU) for i in range(len(opt.replay))]
    for s, theta in zip(samples[1:], live):  # recorded: the float32 parameters, bit for bit
        assert all(p.dtype == torch.float32 and torch.equal(p, t) for p, t in zip(s.params, theta))
    ctx = opt.replay_context()
    s = with_batches(type(samples[0])(**{**samples[0].__dict__, "task_batch": data[0], "meta_batch": data[1]}))
    with torch.no_grad():
        replayed = ctx.update(s, list(s.params))
    gap = sum((a - b).norm() ** 2 for a, b in zip(replayed, samples[1].params)) ** 0.5
    size = sum((a - b).norm() ** 2 for a, b in zip(samples[1].params, s.params)) ** 0.5
    assert 0 < gap < 5e-2 * size  # the replay runs in float32: the loop's step, up to bfloat16 rounding
    # The meta-gradient is Eq. 7 in full precision: the same as in float64 (a bfloat16 replay is ~1e-2 off).
    phi = list(model.warp_parameters())
    grads32, _ = meta_gradient(warpopt.exact, ctx, [s], phi)
    model64 = copy.deepcopy(model).double()
    opt64 = warpopt.WarpGradMetaOptimizer(model64, lr=0.1)
    s64 = type(s)(**{**s.__dict__, "params": [p.double() for p in s.params],
                     "task_batch": tuple(t.double() for t in s.task_batch),
                     "meta_batch": tuple(t.double() for t in s.meta_batch)})
    grads64, _ = meta_gradient(warpopt.exact, opt64.replay_context(), [s64], list(model64.warp_parameters()))
    num = sum((a.double() - b).norm() ** 2 for a, b in zip(grads32, grads64)) ** 0.5
    den = sum(b.norm() ** 2 for b in grads64) ** 0.5
    assert den > 1e-6 and num / den < 1e-4
    assert torch.isfinite(torch.tensor(opt.meta_step()["meta_loss"]))



def test_maml_under_autocast_recomputes_the_loop_loss_under_the_loops_autocast():
    # MAML recomputes the task loss from the model output to build the unrolled step; outside the
    # loop's autocast that loss ran in bfloat16 and the check refused the loop ("a different
    # criterion, a scaled or regularised loss"). θ0's meta-gradient stays close to float32's.
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    criterion = nn.functional.cross_entropy  # on bfloat16 logits outside autocast: a bfloat16 loss
    steps = []
    for amp in (False, True):
        torch.manual_seed(0)
        model = warpopt.warp(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)))
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.maml(), algorithm=warpopt.online(),
                                            meta_optimizer=torch.optim.SGD, meta_lr=1.0)
        before = [t.detach().clone() for t in opt.theta0]
        with opt.task(data, criterion) as task:
            for x, y in task:
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = criterion(model(x), y)  # the bfloat16 logits, as autocast loops write it
                loss.backward()
                opt.step()
        opt.meta_step()
        steps.append(torch.cat([(a - b).reshape(-1) for a, b in zip(before, opt.theta0)]))
    assert (steps[1] - steps[0]).norm() < 5e-2 * steps[0].norm()


def _compiled_run(backend, pass_compiled):
    model = make_model()
    compiled = torch.compile(model, backend=backend)
    opt = warpopt.WarpGradMetaOptimizer(compiled if pass_compiled else model, lr=0.1)
    twin = make_model()
    twin_opt = warpopt.WarpGradMetaOptimizer(twin, lr=0.1)
    for seed in (1, 2):
        adapt(opt, model, batches(seed), forward=compiled)
        adapt(twin_opt, twin, batches(seed))
    for i in range(len(opt.replay)):
        for a, b in zip(opt.replay.sample(i, CPU).params, twin_opt.replay.sample(i, CPU).params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt.meta_step(), twin_opt.meta_step()
    for a, b in zip(model.warp_parameters(), twin.warp_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pass_compiled", [False, True])
def test_a_warped_model_under_torch_compile_in_the_task_loop(pass_compiled):
    _compiled_run("aot_eager", pass_compiled)


@pytest.mark.slow
def test_a_warped_model_under_torch_compile_inductor():
    _compiled_run("inductor", True)


def test_maml_with_a_compiled_model_says_to_replay_and_replaying_matches_eager():
    # maml() differentiates the loop's own forward twice, which compiled graphs cannot; the
    # error was torch's alone. maml(unroll="replay") keeps the loop first order.
    torch._dynamo.reset()  # earlier compilations of the same forward could leave it running eagerly
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.maml())
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="maml\\(\\).*torch.compile.*unroll='replay'"):
        adapt(opt, model, batches(1), forward=compiled)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta)) and opt.counters["tasks"] == 0
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.maml(unroll="replay"))
    twin = make_model()
    twin_opt = warpopt.WarpGradMetaOptimizer(twin, lr=0.1, initialisation=warpopt.maml(unroll="replay"))
    adapt(opt, model, batches(1), forward=compiled)
    adapt(twin_opt, twin, batches(1))
    opt.meta_step(), twin_opt.meta_step()
    for a, b in zip(opt.theta0, twin_opt.theta0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
