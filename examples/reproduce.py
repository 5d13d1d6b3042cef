"""Every reproduction in one command: run the examples, then write report.md and report.json.

    python examples/reproduce.py --quick                        # every quick mode on a CPU
    python examples/reproduce.py --quick --only omniglot maze   # some of them
    python examples/reproduce.py --device cuda                  # the paper's full protocols (GPU, days)
    python examples/reproduce.py --quick --report-only          # rebuild the report from the outputs

Each reproduction runs in this process (its log goes to ``<out>/<name>/log.txt``) under one
progress view, and writes into ``<out>/<name>/``. The report sets each result beside the paper's
number, says which comparison it is (equal meta-steps or equal training time), and puts each
plot beside the paper's figure it corresponds to. Quick modes use a small fraction of the
paper's meta-training: they check the direction of each effect, not the paper's numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import harness

PAPER = "Flennerhag et al., Meta-Learning with Warped Gradient Descent, ICLR 2020"


@dataclass
class Reproduction:
    """One example: its runs (argv lists) per mode, how to read its results, its figures."""

    name: str
    title: str
    paper: str
    quick: list[list[str]]
    full: list[list[str]]
    rows: Callable[[Path], list[dict]]
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file in the run folder, the paper's figure)
    data: Optional[str] = None  # dataset read (for --data-root)


def _load(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _row(what: str, ours: str, paper: str = "–", comparison: str = "") -> dict:
    return {"result": what, "ours": ours, "paper": paper, "comparison": comparison}


def _pct(x: float) -> str:
    return f"{x:.1f} %"


# ----------------------------------------------------------------------------------------- readers
def quickstart_rows(out: Path) -> list[dict]:
    r = _load(out)
    mse = r["held_out_mse"]
    return [_row(f"held-out MSE after {r['steps']} SGD steps, identity warps (plain SGD) → meta-learned warps",
                 f"{mse['sgd_identity_warp']:.3f} → {mse['warpgrad']:.3f}", "– (not in the paper)",
                 f"same θ0, same {r['eval_tasks']} held-out tasks")]


def synthetic_rows(out: Path) -> list[dict]:
    r = _load(out)
    gd, wg = r["gradient_descent"], r["warpgrad"]
    cmp = f"same {r['held_out_starts']} held-out starts, 100 steps each"
    return [_row("held-out starts reaching a local minimum: gradient descent vs WarpGrad",
                 f"{gd['fraction_reached_local_minimum']:.3f} vs {wg['fraction_reached_local_minimum']:.3f}",
                 "– (Fig. 5 shows three surfaces, no numbers)", cmp),
            _row("mean final loss: gradient descent vs WarpGrad",
                 f"{gd['mean_final_loss']:.3f} vs {wg['mean_final_loss']:.3f}", "–", cmp)]


def continual_rows(out: Path) -> list[dict]:
    r = _load(out)
    rows = []
    for order, h in r["headline"].items():
        rows.append(_row(f"final loss on the earlier sub-tasks ({order}): WarpGrad vs plain SGD",
                         f"{h['warpgrad_final_loss_earlier']:.3f} vs {h['sgd_final_loss_earlier']:.3f}",
                         "– (Fig. 10: WarpGrad largely retains earlier sub-tasks; no numbers)",
                         f"same θ0, α and batches, {r['eval_sequences']} held-out sequences"))
    return rows


OMNIGLOT_PAPER = {"warp-leap": "83.8 ± 1.9 %", "leap": "74.8 ± 2.7 %", "reptile": "70.8 ± 1.9 %",
                  "fomaml": "56.7 ± 2.1 % (MAML column)", "finetune": "76.4 ± 2.2 %", "sgd": "51.0 %"}


def omniglot_rows(out: Path) -> list[dict]:
    runs = _load(out)["runs"]
    rows = []
    for method in ("warp-leap", "leap", "reptile", "fomaml", "finetune", "sgd"):
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        seeds = ", ".join(str(r["seed"]) for r in rs)
        n, steps = rs[0]["num_pretrain"], rs[0]["meta_steps"]
        acc = sum(100 * r["test_acc"] for r in rs) / len(rs)
        auc = sum(r["train_auc"] for r in rs) / len(rs)
        cpu = sum(r["train_cpu_s"] for r in rs) / len(rs)
        cmp = "no meta-training (10× batch and lr)" if method == "sgd" else f"equal meta-steps: {steps} ({cpu:.0f} CPU s)"
        rows.append(_row(f"{method}: test accuracy after {len(rs[0]['train_curve'])} steps, N = {n} (seed {seeds}); "
                         f"AUC {auc:.3f}",
                         _pct(acc), OMNIGLOT_PAPER[method] + (" (N = 25, 10 seeds)" if method != "sgd" else ""), cmp))
        eq = [r["equal_time"] for r in rs if "equal_time" in r]
        if eq:
            acc = sum(100 * e["test_acc"] for e in eq) / len(eq)
            rows.append(_row(f"{method} given Warp-Leap's training time: test accuracy; AUC "
                             f"{sum(e['train_auc'] for e in eq) / len(eq):.3f}", _pct(acc), "–",
                             f"equal training time: {sum(e['meta_steps'] for e in eq) / len(eq):.0f} meta-steps, "
                             f"{sum(e['train_cpu_s'] for e in eq) / len(eq):.0f} CPU s (Warp-Leap's "
                             f"{sum(e['budget_cpu_s'] for e in eq) / len(eq):.0f})"))
    return rows


FEWSHOT_PAPER = {  # (dataset, ways, shots, method) -> paper (Table 1) or, for Omniglot, the MAML paper
    ("miniimagenet", 5, 1, "warp-maml"): "52.3 ± 0.8 %", ("miniimagenet", 5, 1, "maml"): "48.7 ± 1.8 %",
    ("miniimagenet", 5, 5, "warp-maml"): "68.4 ± 0.6 %", ("miniimagenet", 5, 5, "maml"): "63.2 ± 0.9 %",
    ("tieredimagenet", 5, 1, "warp-maml"): "57.2 ± 0.9 %", ("tieredimagenet", 5, 1, "maml"): "51.7 ± 1.8 %",
    ("tieredimagenet", 5, 5, "warp-maml"): "74.1 ± 0.7 %", ("tieredimagenet", 5, 5, "maml"): "70.3 ± 1.8 %",
    ("tieredimagenet", 10, 640, "warp-leap"): "80.4 ± 1.6 %",
    ("omniglot", 5, 1, "maml"): "98.7 ± 0.4 % (MAML paper, 60 000 steps; not in the WarpGrad paper)",
    ("omniglot", 20, 1, "maml"): "95.8 ± 0.3 % (MAML paper; not in the WarpGrad paper)",
    ("omniglot", 5, 1, "warp-maml"): "– (the WarpGrad paper has no few-shot Omniglot result)",
    ("omniglot", 20, 1, "warp-maml"): "–",
}


def fewshot_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted([out, *out.iterdir()] if out.is_dir() else []):
        if not (path / "results.json").is_file() or not (path / "config.json").is_file():
            continue
        dataset = json.loads((path / "config.json").read_text())["dataset"]
        for r in _load(path)["results"]:
            key = (dataset, r["ways"], r["shots"], r["meta_learner"])
            what = f"{dataset} {r['ways']}-way {r['shots']}-shot, {r['meta_learner']}: test accuracy"
            rows.append(_row(what, f"{r['accuracy']:.1f} ± {r['ci95']:.1f} %", FEWSHOT_PAPER.get(key, "–"),
                             f"equal meta-steps: {r['meta_steps']} ({r['train_cpu_s']:.0f} CPU s)"))
            if "equal_time" in r:
                e = r["equal_time"]
                rows.append(_row(what + ", given the warp learner's training time", f"{e['accuracy']:.1f} ± "
                                 f"{e['ci95']:.1f} %", "–", f"equal training time: {e['meta_steps']} meta-steps, "
                                 f"{e['train_cpu_s']:.0f} CPU s (budget {e['budget_cpu_s']:.0f})"))
    return rows


def maze_rows(out: Path) -> list[dict]:
    rows = []
    for key, e in _load(out).items():
        kind = key.split("/")[0]
        marks = sorted((int(k[10:]), v["mean"]) for k, v in e.items() if k.startswith("reward_at_"))
        curve = ", ".join(f"{it}: {m:.1f}" for it, m in marks)
        rows.append(_row(f"{kind}, {key.split('/')[1]}: mean reward per episode at iteration ({len(e['seeds'])} seeds)",
                         curve, "– (Fig. 9: Warp-RNN above RNN and HyperRNN over 200 000 iterations)",
                         f"equal iterations; {e['cpu_seconds_per_run']:.0f} CPU s per run"))
        if "vs_rnn_same_seed" in e:
            v = e["vs_rnn_same_seed"]
            rows.append(_row(f"{kind} vs RNN, mean reward over all iterations (same seeds)",
                             f"higher on {v['wins']}/{v['seeds']} seeds, {v['mean_difference_all_episodes']:+.1f}",
                             "Warp-RNN converges faster (Fig. 3/9)", "equal iterations"))
        if "vs_rnn_equal_time" in e:
            v = e["vs_rnn_equal_time"]
            rows.append(_row(f"{kind} vs RNN at the RNN's whole training time", f"{v['reward']['mean']:.1f} vs "
                             f"{v['rnn_reward']['mean']:.1f} (higher on {v['wins']}/{v['seeds']} seeds)", "–",
                             f"equal training time: {v['rnn_cpu_seconds_mean']:.0f} CPU s = iteration "
                             f"{v['iteration_mean']:.0f} of {kind}"))
    return rows


def ngd_rows(out: Path) -> list[dict]:
    """Table 4: mean test accuracy over the seeds run, beside the paper's (4 seeds)."""
    rows_of = importlib.import_module("ngd").ROWS  # method -> (method, preconditioning, warp, paper (mean, std))
    runs = _load(out)["runs"]
    rows = []
    for method, (name, precond, warp, (mean, std)) in rows_of.items():
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        acc = [100 * r["test_acc"] for r in rs]
        seeds = ", ".join(str(r["seed"]) for r in rs)
        cmp = ("fixed random θ0, no meta-training" if warp is None else
               f"fixed random θ0, warps meta-learned for {rs[0].get('meta_steps', '?')} meta-steps")
        rows.append(_row(f"{name}, {precond}: test accuracy after 100 steps (seed {seeds})",
                         _pct(sum(acc) / len(acc)), f"{mean} ± {std} %", cmp))
    return rows


def generic_rows(out: Path) -> list[dict]:
    """Numbers found in results.json (for scripts this file has no reader for)."""
    def walk(prefix: str, value, rows: list) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v, rows)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and len(rows) < 30:
            rows.append(_row(prefix, f"{value:.4g}"))
    rows: list = []
    walk("", _load(out), rows)
    return rows


def _seeds(n: int) -> list[str]:
    return ["--seeds", *map(str, range(n))]


REPRODUCTIONS = [
    Reproduction("quickstart", "Quickstart: sine regression through meta-learned warps", "–", [["--quick"]], [[]],
                 quickstart_rows, [("meta_loss.png", "– (not in the paper)")]),
    Reproduction("synthetic_2d", "Warping 2-D loss surfaces", "Appendix D, Fig. 2 and 5", [["--quick"]], [[]],
                 synthetic_rows, [("trajectories.png", "Fig. 5: gradient descent (black) vs WarpGrad (magenta) on "
                                                       "three surfaces; warped space (top), native space (bottom)"),
                                  ("meta_loss.png", "–")]),
    Reproduction("continual_sine", "Continual sine regression", "Appendix J, Fig. 10/11", [["--quick"]], [[]],
                 continual_rows, [("curves.png", "Fig. 10: per-sub-task log-loss over the 100 steps, (a) "
                                                 "meta-training order, (b) random order [1, 3, 4, 2, 0]"),
                                  ("fig11.png", "Fig. 11: predictions after each sub-task (ground truth, before "
                                                "and after adaptation)"),
                                  ("meta_loss.png", "–")]),
    Reproduction("omniglot", "Multi-shot Omniglot (Warp-Leap)", "Section 4.1, Appendix E/F, Table 2, Fig. 3/6",
                 [["--quick"]],
                 [["--num-pretrain", str(n), *_seeds(10), "--meta-learner", "warp-leap", "leap", "reptile", "fomaml",
                   "finetune", "sgd"] for n in (1, 3, 5, 10, 15, 20, 25)],
                 omniglot_rows, [("fig6.png", "Fig. 6 (and Fig. 3 left): test accuracy (top) and training-accuracy "
                                              "AUC (bottom) vs the number of meta-training alphabets"),
                                 ("curves.png", "– (the paper shows no per-step curves for Omniglot)")],
                 data="omniglot"),
    Reproduction("fewshot", "Few-shot Warp-MAML", "Section 4.1, Appendix H, Table 1",
                 [["--dataset", "omniglot", "--quick", "--meta-learner", "warp-maml", "maml"]],
                 [["--dataset", d, "--ways", "5", "--shots", k, "--meta-learner", "warp-maml", "maml"]
                  for d in ("miniimagenet", "tieredimagenet") for k in ("1", "5")]
                 + [["--dataset", "tieredimagenet", "--protocol", "multishot"]],
                 fewshot_rows, [("fewshot.png", "Table 1 (no figure)"),
                                ("fig8.png", "Fig. 8: multi-shot tieredImageNet learning curves (multishot runs only)")],
                 data="--dataset"),
    Reproduction("maze", "Maze navigation (Warp-RNN)", "Section 4.2, Appendix I, Fig. 3 right / Fig. 9",
                 [["--quick"]], [["--model", "warp-rnn", "rnn", "hyper-rnn", "tnets-rnn", *_seeds(10)]],
                 maze_rows, [("maze_rewards.png", "Fig. 9 (Fig. 3 right): mean reward per episode over training "
                                                  "iterations, inter-quartile ranges over 10 runs")]),
]
if (harness.EXAMPLES / "ngd.py").is_file():  # Appendix G, Table 4 (a script of its own, same conventions)
    REPRODUCTIONS.append(Reproduction(
        "ngd", "WarpGrad vs natural gradient (KFAC)", "Appendix G, Table 4, Fig. 7", [["--quick"]], [_seeds(4)],
        ngd_rows, [("fig7.png", "Fig. 7: mean activation and ‖Cov − I‖ per layer, pre- and post-warping"),
                   ("curves.png", "– (the paper shows no curves for Table 4)")], data="omniglot"))
NAMES = [r.name for r in REPRODUCTIONS]


# ----------------------------------------------------------------------------------------- running
def _run_folder(out: Path, name: str, runs: list, i: int) -> Path:
    return out / name if len(runs) == 1 or name == "omniglot" else out / name / f"run{i}"


def _argv(rep: Reproduction, argv: list[str], folder: Path, args) -> list[str]:
    extra = ["--out", str(folder), "--device", args.device, "--seed", str(args.seed)]
    if args.threads is not None:
        extra += ["--threads", str(args.threads)]
    if rep.data and args.data_root:
        name = rep.data if rep.data != "--dataset" else argv[argv.index("--dataset") + 1]
        extra += ["--data-root", str(Path(args.data_root) / name)]
    return argv + extra


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run(rep: Reproduction, args, out: Path, overall) -> dict:
    runs = rep.quick if args.quick else rep.full
    entry = {"name": rep.name, "title": rep.title, "paper": rep.paper, "commands": [], "status": "ok", "wall_s": 0.0}
    module, problems = importlib.import_module(rep.name), []
    for i, argv in enumerate(runs):
        folder = _run_folder(out, rep.name, runs, i)
        folder.mkdir(parents=True, exist_ok=True)
        full_argv = _argv(rep, argv, folder, args)
        entry["commands"].append(f"python examples/{rep.name}.py " + " ".join(full_argv))
        overall.set_description(f"{rep.name} ({i + 1}/{len(runs)})")
        start = time.perf_counter()
        with open(folder / "log.txt", "w") as log, contextlib.redirect_stdout(log), harness.nested_progress():
            try:
                module.main(full_argv)
            except harness.DataNotFound as e:
                problems.append("skipped: dataset missing")
                entry["message"] = "\n\n".join(filter(None, [entry.get("message"), str(e)]))
            except (Exception, SystemExit) as e:  # one broken reproduction must not stop the others
                problems.append(f"failed: {type(e).__name__}: {e}")
                traceback.print_exc(file=log)
        entry["wall_s"] += time.perf_counter() - start
        overall.update(1)
    if problems:
        entry["status"] = "; ".join(dict.fromkeys(problems))
    return entry


def summarise(rep: Reproduction, entry: dict, out: Path) -> dict:
    folder = out / rep.name
    try:
        entry["rows"] = rep.rows(folder)
    except Exception as e:  # missing or partial outputs
        entry["rows"] = []
        entry.setdefault("message", f"no results to report ({type(e).__name__}: {e})")
    entry["figures"] = [{"ours": str(p.relative_to(out)), "paper": paper}
                        for name, paper in rep.figures for p in sorted(folder.rglob(name))]
    return entry


def markdown(report: dict) -> str:
    mode = "quick modes (CPU)" if report["quick"] else "full protocols"
    m = report["machine"]
    lines = [f"# WarpGrad reproductions: {mode}", "",
             f"`{report['command']}` on {m['machine']}, {m['cpus']} CPUs{', ' + m['gpu'] if 'gpu' in m else ''}, "
             f"torch {m['torch']}, {report['threads']} torch thread(s) per process; wall time "
             f"**{_clock(report['wall_s'])}**. Paper: {PAPER}.", ""]
    if report["quick"]:
        lines += ["Quick modes meta-train for a small fraction of the paper's budget (each section's commands say "
                  "how much), so their numbers are not the paper's: they show the direction of each effect. Where "
                  "methods cost different amounts per meta-step, results are given at equal meta-steps and at "
                  "equal training time (CPU seconds measured in the same run); the *comparison* column says which.", ""]
    lines += ["| reproduction | paper | status | wall time |", "|---|---|---|---|"]
    for e in report["entries"]:
        lines.append(f"| [{e['title']}](#{e['name']}) | {e['paper']} | {e['status']} | {_clock(e['wall_s'])} |")
    for e in report["entries"]:
        lines += ["", f"## {e['title']} <a id=\"{e['name']}\"></a>", "", f"{e['paper']}; {_clock(e['wall_s'])}.", ""]
        lines += [f"    {c}" for c in e["commands"]] + [""]
        if e.get("message"):
            lines += ["```", e["message"], "```", ""]
        if e.get("rows"):
            lines += ["| result | ours | paper | comparison |", "|---|---|---|---|"]
            lines += [f"| {r['result']} | {r['ours']} | {r['paper']} | {r['comparison']} |" for r in e["rows"]]
        if e.get("figures"):
            lines += ["", "| ours | the paper's figure |", "|---|---|"]
            lines += [f"| ![{f['ours']}]({f['ours']}) | {f['paper']} |" for f in e["figures"]]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="every example's CPU mode")
    p.add_argument("--only", nargs="+", choices=NAMES, default=None, metavar="NAME",
                   help=f"these reproductions only, of {', '.join(NAMES)} (default: all)")
    p.add_argument("--device", default="cpu", help="torch device; the full protocols need cuda")
    p.add_argument("--seed", type=int, default=0, help="seed given to every example")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: each example's)")
    p.add_argument("--data-root", default=None,
                   help="the folder holding omniglot/ (miniimagenet/, tieredimagenet/), like $WARPOPT_DATA "
                        "(default: $WARPOPT_DATA, else ./data)")
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce-quick or runs/reproduce)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the outputs, run nothing")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if not args.quick and not args.device.startswith("cuda"):
        p.error("the full protocols take days on a CPU: pass --quick for the CPU modes, or --device cuda")
    out = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    out.mkdir(parents=True, exist_ok=True)
    chosen = [r for r in REPRODUCTIONS if args.only is None or r.name in args.only]
    command = "python examples/reproduce.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    previous = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    before = {e["name"]: e for e in previous.get("entries", [])}
    start, entries = time.perf_counter(), []
    with harness.bar(total=sum(len(r.quick if args.quick else r.full) for r in chosen), desc="reproduce",
                     unit="run", disable=False) as overall:
        for rep in chosen:
            if args.report_only:
                entry = {k: v for k, v in before.get(rep.name, {"name": rep.name, "status": "not run",
                                                                 "wall_s": 0.0, "commands": []}).items()
                         if k not in ("rows", "figures", "message")}
                entry.update(title=rep.title, paper=rep.paper)
            else:
                entry = run(rep, args, out, overall)
                harness.log(f"{rep.name}: {entry['status']} ({_clock(entry['wall_s'])})")
            entries.append(summarise(rep, entry, out))
    report = {"command": command if not args.report_only else previous.get("command", command),
              "quick": args.quick, "device": args.device, "threads": args.threads or 1,
              "machine": harness.machine(args.device),
              "wall_s": (time.perf_counter() - start) if not args.report_only else previous.get("wall_s", 0.0),
              "entries": entries}
    harness.write_json(out, "report.json", report)
    (out / "report.md").write_text(markdown(report))
    print(f"wrote {out / 'report.md'} and {out / 'report.json'} ({_clock(report['wall_s'])})")
    return report


if __name__ == "__main__":
    main()
