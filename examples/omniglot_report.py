"""Aggregate multi-shot Omniglot results: Table 2 layout (Markdown) and Fig. 6-style plots.

    python examples/omniglot_report.py runs/omniglot [more dirs or results.json files] [--out DIR]

Reads every ``results.json`` given (or found under the given directories), groups runs by
(method, warp layer / algorithm / objective, quick?) and number of meta-training tasks N, and
writes ``table.md`` (mean ± std over seeds of held-out test accuracy after 100 steps, and of the
training-accuracy AUC), ``fig6.png`` (accuracy and AUC vs N) and ``curves.png`` (mean training
accuracy per step on the held-out alphabets, largest N of each method).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import harness

plt = harness.pyplot()

ORDER = ["warp-leap", "leap", "reptile", "finetune", "fomaml", "kfac", "sgd"]
TITLES = {"warp-leap": "Warp-Leap", "leap": "Leap", "reptile": "Reptile", "finetune": "Finetuning†",
          "fomaml": "FOMAML", "kfac": "KFAC‡", "sgd": "SGD‡"}
PAPER_25 = {"warp-leap": 83.8, "leap": 74.8, "reptile": 70.8, "finetune": 76.4, "fomaml": 56.7, "kfac": 56.0,
            "sgd": 51.0}


def load_runs(paths) -> list[dict]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("results.json")) if p.is_dir() else [p]
    runs = []
    for f in files:
        for run in json.loads(f.read_text())["runs"]:
            runs.append(run)
            if "equal_time" in run:  # the same run given Warp-Leap's training time: a row of its own
                runs.append({**run, **run["equal_time"], "comparison": "equal time"})
    return runs


def label(run: dict) -> str:
    name = TITLES.get(run["method"], run["method"])
    if run["method"] == "warp-leap":
        extra = [x for x in (run.get("warp_layer"), run.get("algorithm"), run.get("objective"))
                 if x not in (None, "conv", "offline", "exact")]
        name += f" ({', '.join(extra)})" if extra else ""
    return name + (" [quick]" if run.get("quick") else "") + (" [equal time]" if run.get("comparison") else "")


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def aggregate(runs: list[dict]) -> dict:
    """{label: {N: {"acc": (m, sd), "auc": (m, sd), "seeds": n, "curve": [...]}}}."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[label(r)][r["num_pretrain"]].append(r)
    table: dict = {}
    for name, by_n in groups.items():
        table[name] = {}
        for n, rs in sorted(by_n.items()):
            curves = [r["train_curve"] for r in rs]
            steps = min(len(c) for c in curves)
            table[name][n] = {"acc": mean_std([100 * r["test_acc"] for r in rs]),
                              "auc": mean_std([r["train_auc"] for r in rs]), "seeds": len(rs),
                              "meta_steps": mean_std([r["meta_steps"] for r in rs]),
                              "train_cpu_s": mean_std([r.get("train_cpu_s", float("nan")) for r in rs]),
                              "curve": [sum(c[k] for c in curves) / len(curves) for k in range(steps)],
                              "method": rs[0]["method"]}
    return table


def _sorted_labels(table: dict) -> list[str]:
    rank = lambda name: min(ORDER.index(v["method"]) if v["method"] in ORDER else 99  # noqa: E731
                            for v in table[name].values())
    return sorted(table, key=lambda name: (rank(name), name))


def markdown(table: dict) -> str:
    labels = _sorted_labels(table)
    ns = sorted({n for name in labels for n in table[name]})
    lines = ["Test accuracy (%) on the held-out alphabets (--num-eval-tasks, paper 10) after 100 steps, mean ± std over seeds "
             "(seeds in brackets). †Multi-headed. ‡No meta-training, 10x batch size and learning rate.", "",
             "| No. meta-training tasks | " + " | ".join(labels) + " |",
             "|---|" + "---|" * len(labels)]
    for n in ns:
        cells = []
        for name in labels:
            e = table[name].get(n)
            cells.append(f"{e['acc'][0]:.1f} ± {e['acc'][1]:.1f} ({e['seeds']})" if e else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "AUC of the training-accuracy curve on held-out alphabets (mean over 100 steps):", "",
              "| No. meta-training tasks | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for n in ns:
        cells = [f"{table[name][n]['auc'][0]:.3f} ± {table[name][n]['auc'][1]:.3f}" if n in table[name] else ""
                 for name in labels]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Meta-training cost (mean over seeds): " + "; ".join(
        f"{name}: {table[name][n]['meta_steps'][0]:.0f} meta-steps, {table[name][n]['train_cpu_s'][0]:.0f} CPU s (N={n})"
        for name in labels for n in table[name] if table[name][n]["meta_steps"][0] > 0) + ".",
              "Rows compare at equal meta-steps; rows marked [equal time] are the same runs trained on until "
              "they had used Warp-Leap's meta-training CPU time (same seed)."]
    lines += ["", "Paper (Table 2, N = 25, 10 seeds): " +
              ", ".join(f"{TITLES[m]} {v}" for m, v in PAPER_25.items()) + " (MAML column: second-order MAML)."]
    return "\n".join(lines) + "\n"


def plots(table: dict, out: Path) -> None:
    labels = _sorted_labels(table)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in labels:
        ns = sorted(table[name])
        for ax, key in zip(axes, ("acc", "auc")):
            m = [table[name][n][key][0] for n in ns]
            sd = [table[name][n][key][1] for n in ns]
            if len(ns) == 1:  # no meta-training or a single N: draw a point with an error bar
                ax.errorbar(ns, m, yerr=sd, marker="o", capsize=3, label=name)
            else:
                line, = ax.plot(ns, m, marker="o", label=name)
                ax.fill_between(ns, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=line.get_color(), alpha=0.2)
    axes[0].set(xlabel="Number of tasks in meta-training set", ylabel="Test accuracy on held-out tasks (%)")
    axes[1].set(xlabel="Number of tasks in meta-training set", ylabel="Train accuracy AUC on held-out tasks")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig6.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in labels:
        n = max(table[name])
        harness.plot_smoothed(ax, table[name][n]["curve"], label=f"{name} (N={n})", window=10)
    ax.set(xlabel="Task step", ylabel="Training batch accuracy (held-out alphabets; raw faint)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def report(paths, out) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(load_runs(paths))
    if not table:
        return table
    text = markdown(table)
    (out / "table.md").write_text(text)
    plots(table, out)
    print(text)
    print(f"wrote {out / 'table.md'}, {out / 'fig6.png'}, {out / 'curves.png'}")
    return table


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter)
    p.add_argument("paths", nargs="+", help="results.json files or directories holding them")
    p.add_argument("--out", default=None, help="where to write table.md and plots (default: the first path)")
    a = p.parse_args()
    first = Path(a.paths[0])
    report(a.paths, a.out or (first if first.is_dir() else first.parent))
