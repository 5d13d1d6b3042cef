"""The multi-shot Omniglot example (examples/omniglot.py): model, warp variants, end-to-end run."""
import json

import pytest
import torch

import harness
import omniglot as example

DATA = harness.data_root("omniglot")
needs_data = pytest.mark.skipif(not harness.data_present("omniglot", DATA),
                                reason=f"Omniglot not found at {DATA} (set WARPOPT_DATA to the folder holding omniglot/)")


def _args(tmp_path, *extra):
    return example.parse_args(["--num-pretrain", "2", "--meta-batch", "2", "--meta-steps", "1", "--steps", "3",
                               "--eval-steps", "3", "--max-updates", "3", "--num-eval-tasks", "1",
                               "--threads", "1", "--out", str(tmp_path), *extra])


@pytest.mark.parametrize("name", sorted(k for k in example.WARP_LAYERS if k != "none"))
def test_every_warp_variant_inserts_four_identity_warps(name):
    torch.manual_seed(0)
    plain = example.Learner().eval()
    x = torch.rand(4, 1, 28, 28)
    expected = plain(x)
    net = example.Learner()
    net.load_state_dict(plain.state_dict())
    model = example.warpopt.warp(net, where=example.ConvBlock, layer=example.WARP_LAYERS[name]).eval()
    assert len(example.warpopt.warping.warp_layers(model)) == 4
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert list(model.warp_parameters())


def test_baselines_are_the_same_function_with_no_warp_parameters():
    torch.manual_seed(0)
    plain = example.Learner().eval()
    x = torch.rand(4, 1, 28, 28)
    net = example.Learner()
    net.load_state_dict(plain.state_dict())
    model = example.warpopt.warp(net, where=example.ConvBlock, layer=example.WARP_LAYERS["none"]).eval()
    assert torch.equal(model(x), plain(x)) and not list(model.warp_parameters())


def test_quick_settings_apply_but_explicit_flags_win():
    args = example.parse_args(["--quick", "--meta-steps", "3"])
    assert args.meta_steps == 3 and args.num_pretrain == example.QUICK["num_pretrain"]
    assert example.parse_args([]).meta_steps == 1000
    assert example.parse_args(["--algorithm", "online"]).meta_lr == 1e-3


def test_channels_last_is_the_default_and_computes_the_same_function(tmp_path):
    on = example.parse_args(["--out", str(tmp_path)])
    off = example.parse_args(["--no-channels-last", "--out", str(tmp_path)])
    assert on.channels_last and not off.channels_last
    (fast_net, fast), (plain_net, plain) = example.build_model(on, "conv", 0), example.build_model(off, "conv", 0)
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 20, (8,))
    with torch.no_grad():
        for p in [*fast_net.head.parameters(), *plain_net.head.parameters()]:  # a non-zero head
            p.fill_(0.01)
    grads = []
    for model in (fast, plain):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads.append(torch.autograd.grad(loss, list(model.adapt_parameters())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@needs_data
def test_two_task_warp_leap_run_end_to_end(tmp_path):
    args = _args(tmp_path)
    args.run_seed = 0
    data = example.load_omniglot(args.data_root, cache_dir=args.cache_dir)
    train, test = example.multishot_split(data, seed=0, num_pretrain=2)
    net, fresh = example.build_model(args, "conv", 0)
    identity = [p.detach().clone() for p in fresh.warp_parameters()]
    timer = {"task_steps": 0, "task_s": 0.0, "replayed": 0, "meta_s": 0.0}
    model, points = example.meta_train("warp-leap", args, train, torch.Generator().manual_seed(0), timer)
    assert points["equal_time"] is None and points["equal_steps"].steps == 1
    state = points["equal_steps"].state
    theta0 = state["theta0"]
    # φ moved away from the identity, θ0 moved, the head of θ0 is zero (reset for every task).
    assert any(not torch.equal(a, b) for a, b in zip(model.warp_parameters(), identity))
    assert any(not torch.equal(t, p) for t, p in zip(theta0, fresh.adapt_parameters()))
    heads = example.head_slots(model, model)
    assert len(heads) == 2 and all(theta0[j].abs().sum() == 0 for j in heads)
    assert timer["task_steps"] == 2 * 3 and timer["replayed"] == 3
    acc, curves = example.evaluate(model, state, test[:1], 20, 0.1, 3, torch.Generator().manual_seed(1))
    assert 0.0 <= acc[0] <= 1.0 and len(curves[0]) == 3


@needs_data
def test_main_writes_results_config_and_table(tmp_path):
    example.main(["--meta-learner", "warp-leap", "sgd", *_args_list(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["method"] for r in rows} == {"warp-leap", "sgd"}
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_auc"] <= 1.0 and len(r["train_curve"]) == 3
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_pretrain"] == 2 and config["sources"]["num_pretrain"].startswith("command line")
    assert config["sources"]["meta_optimizer"].startswith("default — original")
    table = (tmp_path / "table.md").read_text()
    assert "Warp-Leap" in table and "| 2 |" in table
    assert (tmp_path / "fig6.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0


def _args_list(tmp_path):
    return ["--num-pretrain", "2", "--meta-batch", "2", "--meta-steps", "1", "--steps", "3", "--eval-steps", "3",
            "--max-updates", "3", "--num-eval-tasks", "1", "--threads", "1", "--out", str(tmp_path)]


@needs_data
def test_parallel_workers_give_the_same_results_as_one_process(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    example.main(["--meta-learner", "warp-leap", "sgd", *_args_list(serial)])
    example.main(["--meta-learner", "warp-leap", "sgd", "--workers", "2", *_args_list(parallel)])
    runs = {p: {r["method"]: r for r in json.loads((p / "results.json").read_text())["runs"]}
            for p in (serial, parallel)}
    assert set(runs[serial]) == set(runs[parallel]) == {"warp-leap", "sgd"}
    for method, row in runs[serial].items():
        other = runs[parallel][method]
        assert row["test_acc"] == other["test_acc"] and row["train_curve"] == other["train_curve"]


@needs_data
def test_kfac_baseline_is_a_random_init_large_batch_kfac_run_in_the_report(tmp_path):
    example.main(["--meta-learner", "kfac", "sgd", "--kfac-damping", "0.3", *_args_list(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert set(rows) == {"kfac", "sgd"}
    assert rows["kfac"]["kfac"]["damping"] == 0.3 and rows["sgd"]["kfac"] is None
    assert rows["kfac"]["task_steps"] == 0 == rows["sgd"]["task_steps"]   # no meta-training
    # same init, same batches: a different optimizer gives a different learning curve
    assert rows["kfac"]["train_curve"] != rows["sgd"]["train_curve"]
    table = (tmp_path / "table.md").read_text()
    assert "KFAC‡" in table and "KFAC‡ 56.0" in table
    args = example.parse_args(_args_list(tmp_path))
    args.run_seed = 0
    _, model = example.build_model(args, "none", 0)
    opt = example.kfac_factory(args)(model, list(model.adapt_parameters()), 1.0)
    assert isinstance(opt, example.warpopt.KFAC) and len(opt.layers) == 5   # 4 convs + the head


def test_equal_time_gives_leap_warp_leaps_training_time(tmp_path):
    """Leap is trained on past its equal-steps point until its CPU time reaches Warp-Leap's (same seed)."""
    args = ["--meta-learner", "warp-leap", "leap", "--equal-time", *_args_list(tmp_path)]
    args[args.index("--max-updates") + 1] = "12"  # make a Warp-Leap meta-step clearly dearer than Leap's
    example.main(args)
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert "equal_time" not in rows["warp-leap"]
    eq = rows["leap"]["equal_time"]
    assert eq["budget_cpu_s"] == rows["warp-leap"]["train_cpu_s"]
    assert eq["meta_steps"] > rows["leap"]["meta_steps"] == 1
    per_step = rows["leap"]["train_cpu_s"] / rows["leap"]["meta_steps"]
    assert abs(eq["train_cpu_s"] - eq["budget_cpu_s"]) <= 3 * per_step  # nearest meta-step to the budget
    assert "Leap [equal time]" in (tmp_path / "table.md").read_text()


def test_missing_omniglot_says_what_to_fetch_and_where(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(harness.DataNotFound) as err:
        example.main(["--data-root", str(root), "--out", str(tmp_path / "out")])
    text = str(err.value)
    for expected in ("images_background.zip", "images_evaluation.zip", "github.com/brendenlake/omniglot",
                     str(root.resolve()), "--download", "WARPOPT_DATA", "MIT"):
        assert expected in text
