"""Issue 18: Leap and ``needs_previous`` learners read θ_k off the recorded trajectory instead of
copying it every step, and the NaN/inf check reads θ_K once per task instead of every step's
gradients. Results must equal Eq. 13 (float64, to 1e-12) whichever way θ_k is found."""
import math

import pytest
import torch
from torch import nn

import warpopt

DTYPE = torch.float64
STEPS = 5
loss_fn = nn.functional.mse_loss


def make_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)).to(DTYPE)
    return warpopt.warp(net)


def make_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g, dtype=DTYPE)
    xs = [torch.randn(6, 3, generator=g, dtype=DTYPE) for _ in range(STEPS)]
    return [(x, torch.sin(x @ w)) for x in xs]


# How θ_k reaches Leap: read off the task's recording ("recorded"), or Leap's own copy when the
# task is not recorded at all, records every other step, or records in half precision.
RECORDINGS = {
    "recorded": dict(),
    "not recorded": dict(algorithm=warpopt.algorithms.Algorithm()),  # θ0 only: nothing to replay
    "every 2": dict(replay=lambda: warpopt.ReplayBuffer(every=2)),
    "float16": dict(replay=lambda: warpopt.ReplayBuffer(dtype=torch.float16)),
}
LEARNERS = {
    "train": lambda: warpopt.leap(loss="train"),
    "probe": lambda: warpopt.leap(loss="probe"),
    "no loss term": lambda: warpopt.leap(loss_term=False),
}


def eq13(thetas, grads, losses):
    """−Σ_k (ΔL_k ∇L(θ_{k-1}) + Δθ_k) / ‖(Δθ_k, ΔL_k)‖ over the segments k = 1..len(losses)-1
    (losses None: ΔL = 0 over all K segments), in plain loops."""
    segments = len(thetas) - 1 if losses is None else len(losses) - 1
    total = [torch.zeros_like(t) for t in thetas[0]]
    for k in range(1, segments + 1):
        dtheta = [a - b for a, b in zip(thetas[k], thetas[k - 1])]
        dl = 0.0 if losses is None else losses[k] - losses[k - 1]
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in dtheta) + float(dl) ** 2)
        for acc, g, d in zip(total, grads[k - 1], dtheta):
            acc.sub_((dl * g + d) / norm)
    return total


def run_task(learner, recording, set_to_none=True):
    """One task of STEPS steps (SGD with momentum: Δθ is not a multiple of the gradient); returns
    Leap's contribution (θ0 moves by it: init_lr 1, plain SGD), what Eq. 13 gives from the θ_k,
    gradients and losses the loop saw, whether Leap kept a copy of θ_k and, for the training loss,
    whether it held the loop's last gradients rather than a copy."""
    model, batches = make_model(), make_batches()
    options = {k: (v() if callable(v) else v) for k, v in RECORDINGS[recording].items()}
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, momentum=0.5, meta_lr=0.0, init_lr=1.0,
                                        meta_optimizer=torch.optim.SGD, initialisation=LEARNERS[learner](), **options)
    theta0 = [t.detach().clone() for t in opt.theta0]
    params = list(model.adapt_parameters())
    thetas, grads, losses = [], [], []
    with opt.task(batches, loss_fn) as task:
        kept_copy = opt._run.init_state.last is not None
        for x, y in task:
            thetas.append([p.detach().clone() for p in params])
            opt.zero_grad(set_to_none=set_to_none)
            loss = loss_fn(model(x), y)
            loss.backward()
            grads.append([p.grad.clone() for p in params])
            losses.append(float(loss.detach()))
            opt.step()
        thetas.append([p.detach().clone() for p in params])
        state = opt._run.init_state
        held = state.last_grad is not None and state.last_grad is not state.spare
    opt.meta_step()
    contribution = [a - b for a, b in zip(theta0, opt.theta0)]
    if learner == "probe":  # L(θ_k) on the probe batch (the task's first batch), k = 0..K
        x, y = batches[0]
        func = torch.func.functional_call
        names = [n for n, _ in warpopt.warping.named_adapt_parameters(model)]
        with torch.no_grad():
            losses = [float(loss_fn(func(model, dict(zip(names, t)), (x,), strict=False), y)) for t in thetas]
    expected = eq13(thetas, grads, None if learner == "no loss term" else losses)
    return contribution, expected, kept_copy, held


@pytest.mark.parametrize("recording", list(RECORDINGS))
@pytest.mark.parametrize("learner", list(LEARNERS))
def test_leap_equals_eq13_whether_theta_k_is_read_off_the_recording_or_copied(learner, recording):
    contribution, expected, kept_copy, _ = run_task(learner, recording)
    assert kept_copy == (recording != "recorded")  # the copy is kept only where nothing records θ_k exactly
    assert sum(float(e.abs().sum()) for e in expected) > 1e-2
    for c, e in zip(contribution, expected):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("learner", list(LEARNERS))
def test_reading_theta_k_off_the_recording_is_the_same_arithmetic_as_the_copy(learner):
    recorded, _, _, _ = run_task(learner, "recorded")
    copied, _, _, _ = run_task(learner, "not recorded")
    for a, b in zip(recorded, copied):
        assert torch.equal(a, b)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_leap_holds_the_loops_gradients_only_when_the_loop_hands_out_new_ones(set_to_none):
    """∇L(θ_k) waits one step for L(θ_{k+1}): with zero_grad() (set to None) the loop's own tensors
    are held; zeroed in place they would be overwritten, so they are copied. Eq. 13 either way."""
    contribution, expected, _, held = run_task("train", "recorded", set_to_none)
    assert held == set_to_none
    for c, e in zip(contribution, expected):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-12)


def test_a_loop_that_reuses_held_gradient_memory_is_refused_and_rolled_back():
    """New gradient tensors at the first steps, then zeroed in place: the held ∇L(θ_k) would be
    overwritten. Leap says so (RuntimeError) and the task is rolled back, never a wrong result."""
    model, batches = make_model(), make_batches()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.leap())
    before = [p.detach().clone() for p in model.adapt_parameters()]
    with pytest.raises(RuntimeError, match="zero the gradients the same way"), opt.task(batches, loss_fn) as task:
        for k, (x, y) in enumerate(task):
            opt.zero_grad(set_to_none=k < 3)
            loss_fn(model(x), y).backward()
            opt.step()
    assert opt.counters["tasks"] == 0 and len(opt.replay) == 0
    for a, b in zip(before, model.adapt_parameters()):
        assert torch.equal(a, b)


class PreviousLearner(warpopt.InitialisationLearner):
    """Keeps, per step, the θ_k it was handed as ``previous`` (and whether it was a copy)."""

    needs_previous = True

    def begin_task(self, view):
        return []

    def after_step(self, state, view, previous, grads):
        recorded = view.recorded(view.steps)
        shared = recorded is not None and all(p.data_ptr() == r.data_ptr() for p, r in zip(previous, recorded))
        return [*state, ([p.clone() for p in previous], shared)]


@pytest.mark.parametrize("recording", ["recorded", "not recorded", "every 2"])
def test_previous_is_theta_k_read_off_the_recording_when_there_is_one(recording):
    model, batches = make_model(), make_batches()
    learner = PreviousLearner()
    options = {k: (v() if callable(v) else v) for k, v in RECORDINGS[recording].items()}
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=learner, **options)
    params = list(model.adapt_parameters())
    with opt.task(batches, loss_fn) as task:
        thetas = []
        for x, y in task:
            thetas.append([p.detach().clone() for p in params])
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        state = opt._run.init_state
    assert len(state) == STEPS
    for theta, (previous, shared) in zip(thetas, state):
        assert shared == (recording == "recorded")
        for a, b in zip(theta, previous):
            assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("step", [1, STEPS - 1])
def test_a_nonfinite_gradient_entry_at_any_step_drops_the_task(optimizer, bad, step):
    """θ_K is checked once per task: one NaN/inf gradient entry, even at the last step, under SGD
    (lr 0 for that parameter's group too), Adam, AdamW or RMSprop, still drops the task and restores θ."""
    model, batches = make_model(), make_batches()
    params = list(model.adapt_parameters())
    groups = [{"params": params[:1], "lr": 0.0}, {"params": params[1:]}]
    opt = warpopt.WarpGradMetaOptimizer(model, params=groups, lr=0.1, task_optimizer=optimizer,
                                        initialisation=warpopt.leap(), on_nonfinite="skip")
    before = [p.detach().clone() for p in params]
    with pytest.warns(RuntimeWarning, match="NaN/inf"), opt.task(batches, loss_fn) as task:
        for k, (x, y) in enumerate(task):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if k == step:
                params[0].grad[0, 0] = bad  # one entry, in the group whose lr is 0
            opt.step()
    assert opt.counters["tasks"] == 0 and len(opt.replay) == 0
    for a, b in zip(before, params):
        assert torch.equal(a, b)
