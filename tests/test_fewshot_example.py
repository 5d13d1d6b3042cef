"""examples/fewshot.py: Warp-MAML partition, baselines and 2-episode end-to-end runs."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fewshot
import harness
from fewshot_models import backbone, sgd_adapt, warp_convnet

import warpopt

OMNIGLOT = harness.data_root("omniglot")
TINY = ["--filters", "4", "4", "4", "4", "--meta-steps", "2", "--eval-episodes", "2", "--no-progress",
        "--threads", "1"]


def ConvNet(channels, filters, ways, size, pools=None):  # noqa: N802 - the few-shot backbone
    assert pools is None or pools == len(filters) - (len(filters) > 4)
    return backbone(channels, filters, ways, size)


def test_warp_maml_partition_matches_appendix_h():
    net = ConvNet(1, [8, 8, 8, 8], 5, 28)
    x = torch.randn(4, 1, 28, 28)
    before = net(x)
    model = warp_convnet(net)
    assert torch.allclose(model(x), before, atol=1e-6)  # identity warps
    adapt = {n for n, _ in model.named_adapt_parameters()}
    warp = {n for n, _ in model.named_warp_parameters()}
    assert adapt == {f"features.{i}.{m}.{p}" for i in (1, 2, 3) for m in ("conv", "norm") for p in ("weight", "bias")} \
        | {"head.weight", "head.bias"}
    assert warp == {f"features.0.{m}.{p}" for m in ("conv", "norm") for p in ("weight", "bias")} \
        | {f"features.{i}.conv.warp.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    assert model.features[3].conv.warp.weight.shape == (8, 8, 3, 3)


def test_maml_baselines_run_through_the_library_and_maml_is_second_order():
    """The baselines are WarpGradMetaOptimizer(net, initialisation=maml()/fomaml()) on the plain
    net: MAML's θ0 step equals a hand-written second-order MAML gradient (float64), FOMAML's not."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    qx, qy = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1])
    steps = {}
    for kind in ("maml", "fomaml"):
        torch.manual_seed(1)
        net = ConvNet(1, [4, 4, 4, 4], 2, 28).double()
        theta0 = [p.detach().clone() for p in net.parameters()]
        opt = warpopt.WarpGradMetaOptimizer(net, lr=0.4, meta_optimizer=torch.optim.SGD, meta_lr=1.0,
                                            algorithm=warpopt.online(), initialisation=getattr(warpopt, kind)())
        with opt.task(lambda k: (x, y), F.cross_entropy, meta_data=lambda k: (qx, qy)):
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        opt.meta_step()
        steps[kind] = [a - b for a, b in zip(theta0, opt.theta0)]
    torch.manual_seed(1)
    net = ConvNet(1, [4, 4, 4, 4], 2, 28).double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    theta = sgd_adapt(net, params, lambda k: (x, y), 2, 0.4, create_graph=True)
    loss = F.cross_entropy(torch.func.functional_call(net, theta, (qx,)), qy)
    expected = torch.autograd.grad(loss, list(params.values()))
    for got, want in zip(steps["maml"], expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # FOMAML's gradient is the query gradient at θ_K; MAML's carries the Hessian terms.
    assert not torch.allclose(steps["maml"][0], steps["fomaml"][0], atol=1e-7)


def _check_run(out: Path, kinds):
    res = json.loads((out / "results.json").read_text())["results"]
    cfg = json.loads((out / "config.json").read_text())
    assert [r["meta_learner"] for r in res] == kinds
    for r in res:
        assert 0.0 <= r["accuracy"] <= 100.0 and r["test_episodes"] == 2 and r["meta_steps"] == 2
    assert cfg["sources"]["meta_steps"] == "command line" and cfg["algorithm"].startswith("online")
    assert cfg["sources"]["meta_batch"].startswith("default — paper")
    assert (out / "fewshot.png").stat().st_size > 0
    return res


def _make_mini_imagenet(root: Path, classes=3, per_class=8):
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        data = rng.integers(0, 256, size=(classes * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{split[:2]}{c:05d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)


def test_two_episode_warp_maml_on_generated_miniimagenet(tmp_path):
    _make_mini_imagenet(tmp_path)
    out = tmp_path / "run"
    results = fewshot.main(["--dataset", "miniimagenet", "--data-root", str(tmp_path), "--ways", "2",
                            "--shots", "1", "--queries", "2", "--image-size", "28",
                            "--meta-learner", "warp-maml", "fomaml", "--out", str(out)] + TINY)
    _check_run(out, ["warp-maml", "fomaml"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_shots"] == 5  # paper: meta-train with K = 5 for 1-shot evaluation
    assert results[0]["parameters"]["warp"] > 0 and results[1]["parameters"]["warp"] == 0
    summary = fewshot.main(["--summarize", str(out), str(out), "--out", str(tmp_path / "summary")])
    assert len(summary) == 4 and (tmp_path / "summary" / "fewshot.png").is_file()


def test_warp_maml_meta_step_moves_phi_and_theta0(tmp_path):
    _make_mini_imagenet(tmp_path)
    args = fewshot.parse_args(["--dataset", "miniimagenet", "--data-root", str(tmp_path), "--image-size", "28",
                               "--ways", "2", "--shots", "1", "--queries", "2"] + TINY)
    cfg = fewshot.resolve(args)
    pools = fewshot.load_pools(cfg)
    learner = fewshot.Learner("warp-maml", cfg, 2, 3, torch.device("cpu"))
    phi = [p.detach().clone() for p in learner.model.warp_parameters()]
    theta0 = [t.detach().clone() for t in learner.opt.theta0]
    sampler = fewshot.EpisodeSampler(pools["train"], 2, cfg["train_shots"], 2, seed=0)
    learner.train_step([sampler.episode(0)])
    assert learner.opt.counters["meta_steps"] == 1 and learner.opt.counters["task_steps"] == 5
    assert all(not torch.equal(a, p) for a, p in zip(phi, learner.model.warp_parameters()))
    assert any(not torch.equal(a, t) for a, t in zip(theta0, learner.opt.theta0))


def test_missing_miniimagenet_names_the_expected_files(tmp_path):
    with pytest.raises(harness.DataNotFound) as err:
        fewshot.main(["--dataset", "miniimagenet", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")] + TINY)
    for expected in ("mini-imagenet-cache-train.pkl", "train.csv", "images/*.jpg", "meta-learning-lstm",
                     "ImageNet terms", str(tmp_path.resolve())):
        assert expected in str(err.value)


def test_missing_dataset_exits_with_the_message(tmp_path):
    """From the command line: exit status 2 and the message, no traceback."""
    import subprocess
    import sys

    script = Path(fewshot.__file__)
    done = subprocess.run([sys.executable, str(script), "--dataset", "tieredimagenet", "--data-root", str(tmp_path),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train_images_png.pkl" in done.stderr and "renmengye/few-shot-ssl-public" in done.stderr


def test_multishot_protocol_config():
    cfg = fewshot.resolve(fewshot.parse_args(["--dataset", "tieredimagenet", "--protocol", "multishot"]))
    assert (cfg["ways"], cfg["shots"], cfg["queries"], cfg["filters"]) == ([10], 640, 50, [64, 64, 160, 160, 256, 256])
    assert (cfg["momentum"], cfg["meta_learner"], cfg["meta_steps"], cfg["meta_batch"]) == (0.9, ["warp-leap"], 2000, 5)
    assert (cfg["inner_steps"], cfg["inner_batch"]) == (100, 64)
    net = ConvNet(3, cfg["filters"], 10, 84, pools=5)
    assert net(torch.randn(2, 3, 84, 84)).shape == (2, 10) and net.head.in_features == 2 * 2 * 256


@pytest.mark.skipif(not harness.data_present("omniglot", OMNIGLOT), reason="Omniglot data absent")
def test_two_episode_warp_maml_on_omniglot(tmp_path):
    out = tmp_path / "run"
    fewshot.main(["--dataset", "omniglot", "--ways", "5", "--shots", "1", "--meta-learner", "warp-maml",
                  "--out", str(out), "--cache-dir", str(harness.ROOT / "runs" / "cache")] + TINY)
    _check_run(out, ["warp-maml"])


def _make_tiered(root: Path, classes=3, per_class=8, size=32):
    import io
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        labels = np.repeat(np.arange(classes), per_class)
        images = rng.integers(0, 256, size=(len(labels), size, size, 3), dtype=np.uint8)
        encoded = []
        for a in images:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            encoded.append(buf.getvalue())
        with open(root / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(encoded, f)
        with open(root / f"{split}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": labels, "label_general": labels // 2,
                         "label_specific_str": [f"c{i}" for i in range(classes)],
                         "label_general_str": ["g0", "g1"]}, f)


def test_fig8_from_a_small_generated_multishot_run(tmp_path):
    """A multishot run records learning curves (every step) and the meta-test curve during
    meta-training; the report draws Fig. 8 from the results files of two runs."""
    import fewshot_report
    _make_tiered(tmp_path)
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        fewshot.main(["--dataset", "tieredimagenet", "--protocol", "multishot", "--data-root", str(tmp_path),
                      "--ways", "2", "--shots", "4", "--queries", "2", "--image-size", "32",
                      "--filters", "4", "4", "4", "4", "4", "4", "--meta-steps", "2", "--inner-steps", "3",
                      "--inner-batch", "4", "--meta-batch", "1", "--val-every", "1", "--val-episodes", "1",
                      "--curve-every", "1", "--curve-episodes", "2", "--eval-episodes", "2", "--seed", str(seed),
                      "--no-progress", "--threads", "1", "--no-equal-time", "--out", str(out)])
        runs.append(out)
        r = json.loads((out / "results.json").read_text())["results"][0]
        assert r["meta_learner"] == "warp-leap" and r["protocol"] == "multishot"
        assert r["learning_curve"]["steps"] == [1, 2, 3]
        assert all(0 <= a <= 100 for a in r["learning_curve"]["accuracy"])
        assert [s for s, _ in r["test_curve"]] == [1, 2]
        # the curve's last point is the final test accuracy (same episodes, same batches)
        assert r["learning_curve"]["accuracy"][-1] == pytest.approx(r["accuracy"])
        assert (out / "fig8.png").stat().st_size > 0
    path = fewshot_report.main([str(d) for d in runs] + ["--out", str(tmp_path / "report")])
    assert path == tmp_path / "report" / "fig8.png" and path.stat().st_size > 0


def test_fig8_is_skipped_without_learning_curves(tmp_path):
    import fewshot_report
    assert fewshot_report.fig8([{"meta_learner": "maml", "ways": 5, "shots": 1}], tmp_path) is None
    assert not (tmp_path / "fig8.png").exists()


def test_equal_time_trains_maml_on_to_warp_mamls_cpu_time(tmp_path):
    """MAML is evaluated at Warp-MAML's meta-steps and again at Warp-MAML's measured training time."""
    _make_mini_imagenet(tmp_path)
    out = tmp_path / "run"
    results = fewshot.main(["--dataset", "miniimagenet", "--data-root", str(tmp_path), "--ways", "2", "--shots", "1",
                            "--queries", "2", "--image-size", "28", "--meta-learner", "maml", "warp-maml",
                            "--equal-time", "--out", str(out)] + TINY)
    warp, maml = results  # warp-* first, whatever the order given
    assert warp["meta_learner"] == "warp-maml" and "equal_time" not in warp
    eq = maml["equal_time"]
    assert eq["budget_cpu_s"] == pytest.approx(warp["train_cpu_s"], abs=0.05)
    assert eq["meta_steps"] > maml["meta_steps"] == 2 and len(eq["train_loss"]) == eq["meta_steps"] - 2
    assert 0.0 <= eq["accuracy"] <= 100.0
    saved = json.loads((out / "results.json").read_text())["results"]
    assert saved[1]["equal_time"]["meta_steps"] == eq["meta_steps"]
