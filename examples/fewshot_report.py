"""Fig. 8 (multi-shot tieredImageNet) from ``examples/fewshot.py --protocol multishot`` results.

    python examples/fewshot_report.py runs/multishot_warp runs/multishot_leap [--out DIR]

Top: mean learning curves, query (test) accuracy on held-out meta-test tasks against the task
adaptation step (``learning_curve`` of each run, recorded every ``--curve-every`` steps).
Bottom: mean meta-test accuracy during meta-training (``test_curve``, every ``--val-every``
meta-steps on ``--curve-episodes`` episodes). Runs of the same meta-learner (several seeds or
run folders) are averaged, with ± one standard deviation shaded. ``fewshot.py`` calls ``fig8``
after every multishot run and in ``--summarize``.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np


def _band(ax, xs, ys, label):
    ys = np.asarray(ys, dtype=float)
    m = ys.mean(0)
    line, = ax.plot(xs, m, label=f"{label} ({len(ys)} run{'s' if len(ys) > 1 else ''})")
    if len(ys) > 1:
        sd = ys.std(0, ddof=1)
        ax.fill_between(xs, m - sd, m + sd, color=line.get_color(), alpha=0.2)


def fig8(results: list[dict], out: Path) -> Optional[Path]:
    """Write ``out/fig8.png`` from the runs that have learning curves; None if there are none."""
    runs = [r for r in results if r.get("learning_curve")]
    if not runs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = defaultdict(list)
    for r in runs:
        groups[f"{r['meta_learner']} {r['ways']}-way {r['shots']}-shot"].append(r)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7))
    for label, rs in sorted(groups.items()):
        steps = rs[0]["learning_curve"]["steps"]
        same = [r for r in rs if r["learning_curve"]["steps"] == steps]
        _band(top, steps, [r["learning_curve"]["accuracy"] for r in same], label)
        curves = [r["test_curve"] for r in rs if r.get("test_curve")]
        if curves:
            n = min(len(c) for c in curves)
            _band(bottom, [s for s, _ in curves[0][:n]], [[a for _, a in c[:n]] for c in curves], label)
    top.set(xlabel="task adaptation step", ylabel="test accuracy (%)",
            title="learning curves on held-out meta-test tasks")
    bottom.set(xlabel="meta-training step", ylabel="test accuracy (%)",
               title="held-out meta-test tasks during meta-training")
    top.legend(fontsize=8)
    if bottom.lines:
        bottom.legend(fontsize=8)
    else:
        bottom.text(0.5, 0.5, "no meta-training curve (run with --val-every > 0)", ha="center",
                    transform=bottom.transAxes)
    fig.tight_layout()
    path = Path(out) / "fig8.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> Optional[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with results.json) or results.json files")
    p.add_argument("--out", default=None, help="where to write fig8.png (default: the first run folder)")
    a = p.parse_args(argv)
    results = []
    for run in map(Path, a.runs):
        results += json.loads((run / "results.json" if run.is_dir() else run).read_text())["results"]
    first = Path(a.runs[0])
    out = Path(a.out) if a.out else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    path = fig8(results, out)
    print(f"wrote {path}" if path else "no run with a learning curve (multishot runs record them)")
    return path


if __name__ == "__main__":
    main()
