"""WarpGrad and natural gradient descent on multi-shot Omniglot (WarpGrad Appendix G: Table 4, Fig. 7).

Every method adapts a fixed random initialisation (λC(θ0) = 0: only warps are meta-learned,
``initialisation=warpopt.none()``) for 100 steps with task batches of 200 at learning rate 1.0,
otherwise with the settings of the main Omniglot experiment (``examples/omniglot.py``: the
Leap protocol, 25 meta-training alphabets, 10 held out, offline meta-training with η = 1 and the
exact objective). Rows (Table 4):

    sgd             SGD, no preconditioning                               paper 40.1 ± 6.1
    kfac            KFAC (NGD), linear block-diagonal (warpopt.KFAC)      paper 58.2 ± 3.2
    warp-linear     WarpGrad, linear warps (3x3 conv): block-diagonal     paper 68.0 ± 4.4
    warp-nonlinear  WarpGrad, 2-layer conv + BN + residual + ReLU warps   paper 81.3 ± 4.0

Fig. 7 asks whether the learned geometry is Fisher: under NGD (Natural Neural Nets, Desjardins
et al. 2015) post-warp activations would be zero-centred and whitened, Cov(ω(h(x))) = I. During
adaptation on the held-out alphabets we record, per warp layer, the mean activation and the
Schatten-1 (nuclear) norm of Cov − I of the layer's input (pre-warp) and output (post-warp) on
the task's test images (covariance over channels, one sample per image and position), averaged
over tasks and adaptation steps (every ``--fig7-every`` steps).

    python examples/ngd.py --quick --seeds 0 1 2                     # CPU, all rows, ≤ 15 min
    python examples/ngd.py --device cuda --seeds 0 1 2 3             # the paper's protocol (4 seeds)
    python examples/ngd.py --report --quick --out runs/ngd           # table.md + plots from results.json

Outputs in ``--out``: config.json, results.json (one entry per method and seed), table.md
(Table 4 layout with the paper's numbers), fig7.png and curves.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import harness
import omniglot as og  # the Omniglot model, data, meta-training and evaluation
from harness import no_progress, run_parallel
from omniglot_report import mean_std

warpopt = og.warpopt
ROWS = {  # method -> (Table 4 "Method", "Preconditioning", warp layer of omniglot.WARP_LAYERS, paper (mean, std))
    "sgd": ("SGD", "None", None, (40.1, 6.1)),
    "kfac": ("KFAC (NGD)", "Linear (block-diagonal)", None, (58.2, 3.2)),
    "warp-linear": ("WarpGrad", "Linear (block-diagonal)", "conv", (68.0, 4.4)),
    "warp-nonlinear": ("WarpGrad", "Non-linear (full)", "two-layer-residual", (81.3, 4.0)),
}
QUICK = dict(filters=16, meta_steps=12, meta_batch=2, max_updates=40, num_eval_tasks=10, fig7_every=20,
             workers=2)


NOTES = {"batch_size": "paper (Appendix G: 200)", "lr": "paper (Appendix G: 1.0)",
         "num_pretrain": "main Omniglot experiment (25)", "steps": "main Omniglot experiment (100)",
         "meta_batch": "main Omniglot experiment (20)", "meta_steps": "main Omniglot experiment (1000)",
         "meta_lr": "main Omniglot experiment (0.1)", "replay_batch": "main Omniglot experiment (η = 1)",
         "filters": "paper (64)", "kfac_damping": "ours (unstated in the paper)",
         "kfac_factor_interval": "ours", "kfac_inverse_interval": "ours", "kfac_fisher": "ours",
         "fig7_every": "ours (paper: every step)", "seeds": "paper (4)"}


def parser():
    p = harness.ExampleParser("ngd", __doc__, quick=QUICK, data="omniglot",
                              quick_help="16 filters, 12 meta-steps of 2 tasks, up to 40 warp updates each, "
                                         "Fig. 7 statistics every 20 steps, 2 processes")
    p.add_argument("--method", nargs="+", default=list(ROWS), choices=list(ROWS), help="Table 4 rows")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds in one call (default: --seed)")
    p.add_argument("--cache-dir", default="runs/cache", help="where the resized images are cached")
    p.add_argument("--report", action="store_true", help="only rebuild table.md and plots from --out/results.json")
    p.add_argument("--num-pretrain", type=int, default=25, help="N meta-training alphabets")
    p.add_argument("--num-eval-tasks", type=int, default=10, help="held-out alphabets evaluated")
    p.add_argument("--steps", type=int, default=100, help="task steps during meta-training")
    p.add_argument("--eval-steps", type=int, default=100, help="task steps on held-out alphabets")
    p.add_argument("--batch-size", type=int, default=200, help="task batch")
    p.add_argument("--lr", type=float, default=1.0, help="task learning rate")
    p.add_argument("--filters", type=int, default=64, help="conv filters per block")
    p.add_argument("--meta-batch", type=int, default=20, help="tasks per meta-step")
    p.add_argument("--meta-steps", type=int, default=1000, help="meta-training steps")
    p.add_argument("--meta-lr", type=float, default=0.1, help="warp learning rate")
    p.add_argument("--meta-optimizer", default="sgd", choices=["sgd", "adam"], help="meta optimizer of the warps")
    p.add_argument("--replay-batch", type=int, default=1, help="η, points per warp update")
    p.add_argument("--max-updates", type=int, default=None, help="warp updates per meta-step (None: all points)")
    for k, v in og.KFAC_DEFAULTS.items():
        p.add_argument(f"--kfac-{k.replace('_', '-')}", type=type(v), default=v, help=f"KFAC's {k.replace('_', ' ')}")
    p.add_argument("--fig7-every", type=int, default=10, help="Fig. 7 statistics every this many task steps")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="conv weights in channels-last memory format (faster convolutions)")
    p.add_argument("--workers", type=int, default=1, help="runs (method, seed) in parallel processes")
    return p


def parse_args(argv=None):
    args = parser().parse_args(argv)
    args.seeds = args.seeds or [args.seed]
    # the names omniglot.py's functions read
    args.data, args.inner_lr, args.init_lr, args.objective, args.algorithm = \
        args.data_root, args.lr, args.meta_lr, "exact", "offline"  # (θ0 is fixed: init_lr unused)
    return args


# ----------------------------------------------------------------------------- Fig. 7 statistics
def geometry(h: torch.Tensor) -> tuple[float, float]:
    """Mean activation and ‖Cov(h) − I‖_S1 of activations ``(N, C, *spatial)`` (covariance over C)."""
    x = h.transpose(0, 1).reshape(h.shape[1], -1).double()   # C x (N·positions)
    cov = torch.cov(x)
    return x.mean().item(), torch.linalg.svdvals(cov - torch.eye(len(cov), dtype=cov.dtype)).sum().item()


def fig7_recorder(every: int, store: dict):
    """``on_step`` for ``omniglot.evaluate``: pre-/post-warp statistics on the task's test images."""
    def on_step(model, test_batch, k):
        if k % every:
            return
        seen = {}
        hooks = [w.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0], o)))
                 for n, w in model.warp_layers().items()]
        try:
            with torch.no_grad():
                model(test_batch[0])
        finally:
            for h in hooks:
                h.remove()
        for layer, (pre, post) in enumerate(seen.values()):
            for stage, h in (("pre", pre), ("post", post)):
                mean, s1 = geometry(h)
                store.setdefault(f"{stage}_mean", {}).setdefault(layer, []).append(mean)
                store.setdefault(f"{stage}_s1", {}).setdefault(layer, []).append(s1)
    return on_step


# ----------------------------------------------------------------------------- one run
def run(method: str, args, progress=no_progress) -> dict:
    data = og._load(args.data, args.cache_dir, args.device)
    train_tasks, test_tasks = og.multishot_split(data, seed=args.run_seed, num_pretrain=args.num_pretrain)
    test_tasks = test_tasks[: args.num_eval_tasks]
    gen = torch.Generator().manual_seed(args.run_seed)
    timer = {"task_steps": 0, "task_s": 0.0, "replayed": 0, "meta_s": 0.0}
    start, cpu_start = time.perf_counter(), time.process_time()
    warp_layer = ROWS[method][2]
    if warp_layer:
        args.warp_layer = warp_layer
        model, checkpoints = og.meta_train("warp-leap", args, train_tasks, gen, timer, progress,
                                                initialisation=warpopt.none)
        state = checkpoints["equal_steps"].state
    else:
        _, model = og.build_model(args, "none", args.run_seed)   # the same random θ0 for every row
        state = {"theta0": [p.detach().clone() for p in model.adapt_parameters()], "warp": []}
    fig7: dict = {}
    eval_gen = torch.Generator().manual_seed(10_000 + args.run_seed)
    acc, curves = og.evaluate(model, state, test_tasks, args.batch_size, args.lr, args.eval_steps, eval_gen,
                                   optimizer=og.kfac_factory(args) if method == "kfac" else None,
                                   on_step=fig7_recorder(args.fig7_every, fig7) if warp_layer else None)
    progress(1)
    curve = torch.tensor(curves).mean(0).tolist()
    return {"method": method, "seed": args.run_seed, "test_acc": sum(acc) / len(acc),
            "test_acc_per_task": dict(zip([t.name for t in test_tasks], acc)), "train_curve": curve,
            "train_auc": sum(curve) / len(curve), "quick": args.quick, "filters": args.filters,
            "meta_steps": args.meta_steps if warp_layer else 0, "kfac": og.kfac_settings(args)
            if method == "kfac" else None, "time_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu_start, **timer,
            "fig7": {k: [sum(v[i]) / len(v[i]) for i in sorted(v)] for k, v in fig7.items()}}


def _job(job, progress):
    method, seed, args = job
    args = copy.copy(args)
    args.run_seed = seed
    return run(method, args, progress)


# ----------------------------------------------------------------------------- report
def table(runs: list[dict]) -> str:
    steps = sorted({len(r["train_curve"]) for r in runs})
    lines = [f"Test accuracy (%) on held-out alphabets after {'/'.join(map(str, steps))} steps from a random "
             "initialisation, mean ± std over seeds (Table 4 layout; the paper: accuracy, 4 seeds).", "",
             "| Method | Preconditioning | ours | seeds | per seed | paper |", "|---|---|---|---|---|---|"]
    for method, (name, pre, _, (pm, ps)) in ROWS.items():
        rs = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        if not rs:
            continue
        m, sd = mean_std([100 * r["test_acc"] for r in rs])
        per = " / ".join(f"{100 * r['test_acc']:.1f}" for r in rs)
        lines.append(f"| {name} | {pre} | {m:.1f} ± {sd:.1f} | {', '.join(str(r['seed']) for r in rs)} | {per} | "
                     f"{pm} ± {ps} |")
    return "\n".join(lines) + "\n"


def plots(runs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warped = [m for m in ROWS if ROWS[m][2] and any(r["method"] == m and r["fig7"] for r in runs)]
    if warped:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        width = 0.8 / (2 * len(warped))
        for i, method in enumerate(warped):
            rs = [r for r in runs if r["method"] == method and r["fig7"]]
            for j, stage in enumerate(("pre", "post")):
                for ax, key in zip(axes, ("mean", "s1")):
                    per_layer = list(zip(*[r["fig7"][f"{stage}_{key}"] for r in rs]))
                    stats = [mean_std(list(v)) for v in per_layer]
                    xs = [layer + 1 + (2 * i + j - len(warped) + 0.5) * width for layer in range(len(stats))]
                    ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=2,
                           label=f"WarpGrad {ROWS[method][1].split()[0].lower()}, {stage}-warp",
                           color=f"C{2 * i + j}")
        axes[0].set(xlabel="Layer", ylabel="Expected activation", title="mean activation E[h(x)]")
        axes[1].set(xlabel="Layer", ylabel="Schatten-1 norm of Cov − I", title="‖Cov(h(x), h(x)) − I‖_S1")
        for ax in axes:
            ax.set_xticks(range(1, len(stats) + 1))
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fig7.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, (name, pre, _, _) in ROWS.items():
        rs = [r for r in runs if r["method"] == method]
        if rs:
            curve = [sum(c) / len(rs) for c in zip(*[r["train_curve"] for r in rs])]
            ax.plot(range(1, len(curve) + 1), curve, label=f"{name}, {pre.lower()}")
    ax.set(xlabel="Task step", ylabel="Training batch accuracy (held-out alphabets)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def report(out: Path, quick: bool) -> str:
    """table.md, fig7.png and curves.png from the quick-mode (or the protocol's) runs in results.json."""
    runs = [r for r in json.loads((out / "results.json").read_text())["runs"] if r["quick"] == quick]
    if not runs:
        return f"no {'quick-mode' if quick else 'full-protocol'} runs in {out / 'results.json'}\n"
    text = table(runs)
    (out / "table.md").write_text(text)
    plots(runs, out)
    return text


def main(argv=None) -> str:
    args = parse_args(argv)
    harness.start(args)
    out = Path(args.out)
    if args.report:
        text = report(out, args.quick)
        print(text)
        return text
    if args.download:
        harness.fetch_data("omniglot", Path(args.download))
    harness.require_data("omniglot", Path(args.data_root))
    harness.write_config(args, NOTES, initialisation="none: a fixed random θ0 (paper, Appendix G)",
                         rows="paper (Appendix G/F): " + ", ".join(ROWS))
    results = out / "results.json"
    runs = json.loads(results.read_text())["runs"] if results.exists() else []
    jobs = sorted(((m, s, args) for s in args.seeds for m in args.method), key=lambda j: ROWS[j[0]][2] is None)
    units = sum((args.meta_steps if ROWS[m][2] else 0) + 1 for m, _, _ in jobs)
    key = lambda r: (r["method"], r["seed"], r["quick"])  # noqa: E731
    t0 = time.perf_counter()
    for row in run_parallel(_job, jobs, workers=args.workers, threads=args.threads or 1, total=units, desc="ngd"):
        runs = [r for r in runs if key(r) != key(row)] + [row]
        harness.write_json(out, "results.json", {"runs": runs})
        harness.log(f"seed {row['seed']} {row['method']:14s} test acc {100 * row['test_acc']:.1f}%  "
                    f"({row['time_s']:.0f} s)")
    text = report(out, args.quick)
    print(text + f"wall time {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return text


if __name__ == "__main__":
    harness.cli(main)
