"""Smoke and behaviour tests for the issue-3 examples (synthetic 2-D surfaces, continual sine)."""
import copy
import functools
import importlib.util
import json
import math
import os

import pytest
import torch

import warpopt

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def s2d():
    return load("synthetic_2d")


@pytest.fixture(scope="module")
def cs():
    return load("continual_sine")


# ----------------------------------------------------------------------------- synthetic 2-D
def test_surface_matches_appendix_d_formula(s2d):
    c = torch.tensor([3.0, 1.0, -1.0, 0.0, 2.0, -4.0, 5.0], dtype=torch.float64)  # s, a1..a3, b1..b3
    x1, x2 = 0.3, -0.7
    expected = (2.0 * (1.0 - x1) ** 2 * math.exp(-x1 ** 2 - (x2 - 1.0) ** 2)
                + 4.0 * (x1 / 3.0 - x1 ** 3 - x2 ** 5) * math.exp(-x1 ** 2 - x2 ** 2)
                - 5.0 * math.exp(-(x1 + 0.0) ** 2 - x2 ** 2))
    got = s2d.surface(c, torch.tensor([x1, x2], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_surfaces_sample_the_stated_supports(s2d):
    c = s2d.sample_surfaces(2000, torch.Generator().manual_seed(0))
    assert set(c[:, 0].long().tolist()) == set(range(1, 11))
    assert set(c[:, 1:4].long().flatten().tolist()) == {-1, 0, 1}
    assert set(c[:, 4:].long().flatten().tolist()) == set(range(-5, 6))


def test_minimum_criterion_rejects_the_flat_plateau(s2d):
    c = torch.tensor([[3.0, 1.0, -1.0, 0.0, 2.0, -4.0, 5.0]], dtype=torch.float64)
    far = torch.tensor([[3.4, 3.4]], dtype=torch.float64)
    strict, small_grad = s2d.reached_minimum(c, far, 1e-3, 1e-2)
    assert bool(small_grad[0]) and not bool(strict[0])  # tiny gradient, but not a minimum
    # A long, small-step descent from near the origin converges to a genuine minimum.
    end = s2d.descend(c, torch.tensor([[0.1, 0.1]], dtype=torch.float64), 3000, 0.02)[-1]
    strict, _ = s2d.reached_minimum(c, end, 1e-3, 1e-2)
    assert bool(strict[0])


def test_warp_partition_and_identity_start(s2d):
    model = warpopt.warp(s2d.WarpedPoint(4).double(), where=None, designate="omega")
    assert [n for n, _ in model.named_adapt_parameters()] == ["theta"]
    assert all(n.startswith("omega.") for n, _ in model.named_warp_parameters())
    theta = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(model.omega(theta), theta)


def test_synthetic_2d_quick_path_writes_outputs(s2d, tmp_path):
    out = tmp_path / "s2d"
    results = s2d.main(["--meta-steps", "3", "--steps", "10", "--eval-tasks", "3", "--eval-starts", "4",
                        "--out", str(out), "--no-progress"])
    config = json.loads((out / "config.json").read_text())
    saved = json.loads((out / "results.json").read_text())
    assert config["lr"] == 0.1 and config["algorithm"].startswith("online")
    assert saved["held_out_starts"] == 12 and len(saved["meta_loss_history"]) == 3
    for key in ("gradient_descent", "warpgrad", "warpgrad_before_meta_training"):
        assert 0.0 <= saved[key]["fraction_reached_local_minimum"] <= 1.0
    # Ω starts as the identity, so before meta-training WarpGrad *is* gradient descent.
    assert saved["warpgrad_before_meta_training"] == saved["gradient_descent"]
    assert results["warpgrad"] == saved["warpgrad"]
    assert (out / "trajectories.png").stat().st_size > 0 and (out / "meta_loss.png").exists()


# ----------------------------------------------------------------------------- continual sine
def test_meta_batch_follows_eq19(cs):
    args = cs.parse_args(["--quick"])
    p = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3])
    task = cs.make_task(p, [0, 1, 2, 3, 4], args, torch.Generator().manual_seed(0), torch.device("cpu"))
    x, y, w = task.meta_batch(45)  # step 45: third sub-task, so sub-tasks 0, 1, 2
    assert x.shape == (3 * args.val_batch, 1) and x.min() >= -5 and x.max() <= 1
    assert torch.allclose(y, cs.target(p, x))
    assert w.sum().item() == pytest.approx(1.0)
    xt, yt = task.task_batch(45)
    assert xt.shape == (args.batch, 1) and xt.min() >= -1 and xt.max() <= 1
    _, _, w_last = task.meta_batch(100)  # θ_K: still the last sub-task
    assert len(w_last) == 5 * args.val_batch
    args = cs.parse_args(["--quick", "--meta-weighting", "appearance"])
    task = cs.make_task(p, [0, 1, 2, 3, 4], args, torch.Generator().manual_seed(0), torch.device("cpu"))
    _, _, w = task.meta_batch(45)
    per_subtask = w.view(3, -1).sum(1)
    assert torch.allclose(per_subtask, torch.tensor([1 / 100, 1 / 80, 1 / 60]))


def test_identity_warp_evaluates_as_plain_sgd(cs):
    torch.manual_seed(0)
    args = cs.parse_args(["--quick", "--eval-val", "4", "--eval-every", "5"])
    net = cs.build_net(16)
    baseline = copy.deepcopy(net)
    model = warpopt.warp(net, layer=functools.partial(warpopt.MLPResidualWarp, hidden=8))
    seqs = cs.sample_sequences(3, torch.Generator().manual_seed(1))
    theta = {k: v.detach().clone() for k, v in model.named_adapt_parameters()}
    warped = cs.run_sequences(model, theta, seqs, cs.RANDOM_ORDER, 0.01, args, torch.Generator().manual_seed(2), "cpu")
    plain = cs.run_sequences(baseline, dict(baseline.named_parameters()), seqs, cs.RANDOM_ORDER, 0.01, args,
                             torch.Generator().manual_seed(2), "cpu")
    assert warped.shape == (3, 21, 5)
    assert torch.allclose(warped, plain, rtol=1e-5, atol=1e-6)
    # Sub-task 1 is presented first (steps 0-19, curve index 4 = step 20): its loss went down.
    assert plain[:, 4, 1].mean() < plain[:, 0, 1].mean()


def test_continual_sine_quick_path_writes_outputs(cs, tmp_path):
    out = tmp_path / "cs"
    cs.main(["--quick", "--meta-steps", "2", "--meta-batch", "1", "--hidden", "16", "--warp-hidden", "8",
             "--max-updates", "3", "--eval-sequences", "3", "--eval-val", "4", "--sgd-lrs", "0.01",
             "--out", str(out), "--no-progress"])
    config = json.loads((out / "config.json").read_text())
    saved = json.loads((out / "results.json").read_text())
    assert config["lr"] == 1e-3 and config["algorithm"].startswith("offline")
    assert len(config["warp_layers"]) == 3
    assert len(saved["meta_loss_history"]) == 2 and all(math.isfinite(v) for v in saved["meta_loss_history"])
    assert set(saved["learners"]) == {"WarpGrad", "SGD α=0.001", "SGD α=0.01"}
    for order in ("meta-training order", "random order"):
        r = saved["learners"]["WarpGrad"][order]
        assert len(r["mean_curve_by_subtask"]["0"]) == 21
        assert math.isfinite(saved["headline"][order]["warpgrad_final_loss_earlier"])
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "fig11.png").stat().st_size > 0
    fig11 = saved["fig11"]["predictions"]
    assert set(fig11) == {"meta-training order", "random order"}
    assert all(len(v) == 6 and len(v[0]) == 200 for preds in fig11.values() for v in preds.values())


def test_fig11_predictions_follow_the_subtasks(cs):
    """Before adaptation = θ0's prediction; after sub-task s the fit on s's interval has improved;
    with identity warps the warped model predicts as the plain net."""
    torch.manual_seed(0)
    args = cs.parse_args(["--quick"])
    net = cs.build_net(40)
    baseline = copy.deepcopy(net)
    model = warpopt.warp(net, layer=functools.partial(warpopt.MLPResidualWarp, hidden=8))
    p = cs.sample_sequences(1, torch.Generator().manual_seed(3))[0]
    theta = {k: v.detach().clone() for k, v in model.named_adapt_parameters()}
    preds = cs.subtask_predictions(model, theta, p, cs.RANDOM_ORDER, 0.01, args, torch.Generator().manual_seed(4), "cpu")
    plain = cs.subtask_predictions(baseline, dict(baseline.named_parameters()), p, cs.RANDOM_ORDER, 0.01, args,
                                   torch.Generator().manual_seed(4), "cpu")
    assert preds.shape == (6, 200)
    torch.testing.assert_close(preds, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(preds[0], baseline(cs.FIG11_X[:, None])[:, 0])
    x, truth = cs.FIG11_X, cs.target(p, cs.FIG11_X)
    for row, sub in enumerate(cs.RANDOM_ORDER):
        inside = (x >= -5 + 2 * sub) & (x <= -3 + 2 * sub)
        err = lambda pred: (pred[inside] - truth[inside]).pow(2).mean()  # noqa: E731
        assert err(preds[row + 1]) < err(preds[row])
