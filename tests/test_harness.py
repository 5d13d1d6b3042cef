"""The examples' shared harness (examples/harness.py): command line, data roots, outputs, fair comparisons."""
import importlib
import itertools
import json
import re

import pytest
import torch

import harness

EXAMPLES = ["quickstart", "synthetic_2d", "continual_sine", "omniglot", "fewshot", "maze", "ngd"]


def _parser(name):
    module = importlib.import_module(name)
    return module.parser()


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_takes_the_common_options_and_shows_every_default(name):
    parser = _parser(name)
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"--seed", "--device", "--quick", "--out", "--threads", "--no-progress"} <= options
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = formatter._expand_help(action)
        assert "default" in text, f"{name} {action.option_strings}: {text!r} does not show its default"
    assert parser.format_help()  # renders (no stray % in a help string)
    # A "\\" continuation inside a (non-raw) docstring joins two command lines with a run of spaces.
    assert not re.search(r"\S {4,}--", parser.description or ""), "a command line in the docstring was joined"


def test_quick_values_show_in_help_and_apply_unless_given():
    parser = _parser("omniglot")
    help_text = " ".join(parser.format_help().split())
    assert "(default: 1000; --quick: 105)" in help_text
    args = parser.parse_args(["--quick", "--filters", "16"])
    assert (args.meta_steps, args.filters, args.num_eval_tasks) == (105, 16, 10)
    assert args._origin["meta_steps"] == "--quick" and args._origin["filters"] == "command line"
    assert args._origin["inner_lr"] == "default"
    full = parser.parse_args(["--meta-steps=7"])  # the --opt=value form counts as given
    assert full.meta_steps == 7 and full._origin["meta_steps"] == "command line"


def test_config_records_each_values_origin_and_the_machine(tmp_path):
    parser = harness.ExampleParser("demo", "demo", quick={"steps": 3})
    parser.add_argument("--steps", type=int, default=10, help="steps")
    parser.add_argument("--lr", type=float, default=0.1, help="lr")
    args = parser.parse_args(["--quick", "--lr", "0.5", "--out", str(tmp_path)])
    config = harness.write_config(args, {"steps": "paper (10)"}, algorithm="online")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == config and (saved["steps"], saved["lr"]) == (3, 0.5)
    assert saved["sources"]["steps"] == "--quick — paper (10)"
    assert saved["sources"]["lr"] == "command line" and saved["sources"]["seed"] == "default"
    assert saved["sources"]["algorithm"] == "fixed"
    assert saved["command"] == f"python examples/demo.py --quick --lr 0.5 --out {tmp_path}"
    assert saved["machine"]["torch"] == torch.__version__


def test_data_root_comes_from_the_flag_then_the_variable_then_dot_data(monkeypatch, tmp_path):
    monkeypatch.delenv(harness.DATA_ENV, raising=False)
    assert str(harness.data_root("omniglot")) == "data/omniglot"
    monkeypatch.setenv(harness.DATA_ENV, str(tmp_path))
    assert harness.data_root("omniglot") == tmp_path / "omniglot"
    assert harness.data_root("omniglot", "/x/y") == harness.Path("/x/y")
    args = _parser("omniglot").parse_args([])
    assert args.data_root == str(tmp_path / "omniglot")
    args = _parser("fewshot").parse_args(["--dataset", "tieredimagenet"])
    assert args.data_root == str(tmp_path / "tieredimagenet")


def test_download_reads_from_its_folder_and_conflicts_are_refused(tmp_path):
    parser = _parser("omniglot")
    assert parser.parse_args(["--download", str(tmp_path)]).data_root == str(tmp_path)
    with pytest.raises(SystemExit):
        parser.parse_args(["--download", str(tmp_path), "--data-root", str(tmp_path / "other")])


@pytest.mark.parametrize("layout", [("images_background.zip", "images_evaluation.zip"),
                                    ("images_background/", "images_evaluation/"),
                                    ("omniglot-py/images_background/", "omniglot-py/images_evaluation/")])
def test_omniglot_layouts_are_recognised(tmp_path, layout):
    assert not harness.data_present("omniglot", tmp_path)
    for path in layout:
        target = tmp_path / path
        if path.endswith("/"):
            target.mkdir(parents=True)
        else:
            target.write_bytes(b"")
    assert harness.data_present("omniglot", tmp_path)
    with pytest.raises(harness.DataNotFound):
        harness.require_data("omniglot", tmp_path / "elsewhere")


def test_images_csv_layout_needs_the_images_folder(tmp_path):
    for name in ("train.csv", "val.csv", "test.csv"):
        (tmp_path / name).write_text("filename,label\n")
    assert not harness.data_present("miniimagenet", tmp_path)
    (tmp_path / "images").mkdir()
    assert harness.data_present("miniimagenet", tmp_path)


def test_only_omniglot_can_be_fetched(tmp_path):
    with pytest.raises(harness.DataNotFound, match="cannot be downloaded"):
        harness.fetch_data("miniimagenet", tmp_path)


class _Clock:
    """A fake process clock: each step costs ``cost`` CPU seconds."""

    def __init__(self, cost):
        self.cost, self.now = cost, 0.0

    def step(self):
        self.now += self.cost


def _fake_clock(monkeypatch, clock):
    monkeypatch.setattr(harness.time, "process_time", lambda: clock.now)
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock.now)


def test_equal_steps_and_equal_time_checkpoints(monkeypatch):
    clock = _Clock(0.25)
    _fake_clock(monkeypatch, clock)
    counter = itertools.count(1)
    state = {"n": 0}

    def step():
        clock.step()
        state["n"] = next(counter)

    out = harness.train_for_comparison(step, lambda: state["n"], steps=4, budget=lambda: 2.1)
    assert out["equal_steps"] == harness.Checkpoint(4, 4, 1.0, 1.0)
    assert out["equal_time"].steps == 8 and out["equal_time"].state == 8  # 2.0 s is nearest to 2.1 s
    assert harness.train_for_comparison(step, lambda: 0, steps=2)["equal_time"] is None
    # A budget below the equal-steps time (the method is the dearer one): no equal-time point.
    assert harness.train_for_comparison(step, lambda: 0, steps=4, budget=lambda: 0.5)["equal_time"] is None


def test_a_budget_known_only_later_is_met(monkeypatch):
    """The reference run finishes in another process while this one trains on (omniglot --workers 2)."""
    clock = _Clock(1.0)
    _fake_clock(monkeypatch, clock)
    n = {"steps": 0}

    def step():
        clock.step()
        n["steps"] += 1

    out = harness.train_for_comparison(step, lambda: n["steps"], steps=2,
                                       budget=lambda: 5.0 if n["steps"] >= 9 else None)
    assert out["equal_time"].steps == 5 and out["equal_time"].cpu_s == 5.0  # overshot to 9, kept step 5
    capped = harness.train_for_comparison(step, lambda: 0, steps=2, budget=lambda: None, max_steps=6)
    assert capped["equal_time"] is None


@pytest.mark.parametrize("pool", ["conv", "last", None])
def test_conv_block_orders(pool):
    torch.manual_seed(0)
    block = harness.ConvBlock(3, 4, pool=pool, batch_stats=pool == "last")
    x = torch.randn(2, 3, 8, 8)
    c = block.conv(x)
    expected = {"conv": lambda: block.relu(block.norm(block.pool(c))),
                "last": lambda: block.pool(block.relu(block.norm(c))),
                None: lambda: block.relu(block.norm(c))}[pool]()
    assert torch.equal(block(x), expected)
    assert block.norm.track_running_stats == (pool != "last")
    with pytest.raises(ValueError):
        harness.ConvBlock(3, 4, pool="first")


def test_evaluate_adapts_a_copy_and_only_the_given_parameters():
    torch.manual_seed(0)
    net = harness.ConvNet(1, [4, 4], 3, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    task = (lambda k: (x, y), (x, y))
    head_only = {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith("head")}
    everything = {n: p.detach().clone() for n, p in net.named_parameters()}
    a = harness.evaluate(net, head_only, [task], steps=5, lr=0.5)
    b = harness.evaluate(net, everything, [task], steps=5, lr=0.5)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items() if "running" not in k)
    assert len(a["train_curves"][0]) == 5 and a["train_curves"][0][0] == b["train_curves"][0][0]
    assert a["train_curves"] != b["train_curves"]  # the body adapted only in b
    zero = harness.evaluate(net, everything, [task], steps=0, lr=0.5)
    with torch.no_grad():
        net.train()
        direct = (net(x).argmax(1) == y).float().mean().item()
    assert zero["accuracy"] == [direct]


def test_smooth_is_a_trailing_mean():
    assert harness.smooth([1, 3, 5, 7], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert harness.mean_ci95([1.0, 1.0])[1] == 0.0


def test_reproduce_and_report_scripts_show_their_defaults():
    import reproduce

    parser = reproduce.parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in formatter._expand_help(action), action.option_strings
