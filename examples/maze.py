"""Maze navigation with a Warp-RNN (WarpGrad paper, Section 4.2 (c.1), Appendix I, Fig. 3/9).

An advantage actor-critic RNN learns to find a goal in a maze, return to it after each teleport,
and, across episodes (each with a new goal), to explore. The Warp-RNN modulates the task RNN
with a meta-LSTM warp layer that is frozen during task updates and meta-learned with the
continual algorithm (Algorithm 3, approximate objective Eq. 8 harvested from the A2C backward,
warp update every 30th task update). Baselines in the same harness: the plain RNN, a HyperRNN
(the meta-LSTM trained at every update) and a T-Nets-RNN (linear warps T_h, T_x, T_b).

"Episodes" (``--episodes``, the plot's x-axis) count training iterations as the paper's Fig. 3/9
do: each one is a batch of 30 parallel 200-step episodes and one A2C update.

    # quick comparison on 2 CPU cores (about 12 minutes), then the plot:
    python examples/maze.py --quick
    # the paper's protocol (200 000 updates x 10 seeds, all models; GPU):
    python examples/maze.py --model warp-rnn rnn hyper-rnn tnets-rnn --seeds 0 1 2 3 4 5 6 7 8 9 --device cuda
    # re-plot everything found in the out dir:
    python examples/maze.py --report

Where the models cost different amounts per iteration, results.json compares them at equal
iterations and at equal training time (CPU seconds, measured per run).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

import harness
import warpopt
from maze_agents import MODELS, WARP_MODULES, make_agent, run_episodes, warp_agent
from warpopt.envs.maze import MazeVectorEnv

COLOURS = {"warp-rnn": "tab:red", "rnn": "tab:blue", "hyper-rnn": "tab:green", "tnets-rnn": "tab:purple"}
NOTES = {
    "size": "paper text: 11 (original code / Backpropamine: 13; Miconi et al. 2019: 9)",
    "episode_length": "paper (200)", "batch": "paper (30)", "hidden": "paper (100)",
    "meta_hidden": "original implementation (LSTMCell 117->100)", "gamma": "original implementation (0.9)",
    "value_weight": "original implementation (0.1)", "entropy_weight": "original implementation (0.03)",
    "entropy": "original implementation: sum of squared action probabilities as the penalty",
    "clip": "original implementation (4.0, on the task parameters' gradient norm)",
    "lr": "paper (Adam 1e-3)", "meta_lr": "original implementation (Adam 1e-3)",
    "warp_every": "paper (30)", "gate": "ours: U = 1 + tanh(Pz), P zero-init (paper: tanh(Pz)); see warpopt/rnn.py",
    "episodes": "paper (200 000 training iterations)", "seeds": "paper (10 runs)",
}
# Quick mode compresses 200 000 updates into 400: a warp update every 5th task update gives the
# meta-LSTM 80 updates instead of 13, so the warp has a chance to act within the budget.
QUICK = {"model": ["warp-rnn", "rnn"], "episodes": 400, "seeds": list(range(10)), "size": 9, "warp_every": 5,
         "workers": 2}
CHECKPOINTS = 100  # cumulative CPU time is recorded at this many evenly spaced iterations (equal-time comparison)


def parser():
    p = harness.ExampleParser("maze", __doc__, quick=QUICK,
                              quick_help="warp-rnn vs rnn, 10 seeds, 9x9 maze, 400 updates, warp update every 5th, "
                                         "2 workers (about 12 min on 2 cores)")
    p.add_argument("--model", nargs="+", choices=MODELS, default=["warp-rnn"], help="one or more models")
    p.add_argument("--episodes", type=int, default=200_000, help="training iterations (batches of 30 episodes)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds (default: --seed)")
    p.add_argument("--size", type=int, default=11, help="maze side (odd)")
    p.add_argument("--episode-length", type=int, default=200, help="steps per episode")
    p.add_argument("--batch", type=int, default=30, help="parallel episodes per update")
    p.add_argument("--hidden", type=int, default=100, help="RNN hidden units")
    p.add_argument("--meta-hidden", type=int, default=100, help="meta-LSTM hidden units")
    p.add_argument("--gate", choices=["shifted", "paper"], default="shifted",
                   help="Warp-RNN gates: 1 + tanh(Pz) with P = 0 at init (ours) or tanh(Pz) (paper)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the task parameters")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate of the warp parameters")
    p.add_argument("--warp-every", type=int, default=30, help="task updates per warp update")
    p.add_argument("--clip", type=float, default=4.0, help="gradient-norm clip of the task parameters")
    p.add_argument("--gamma", type=float, default=0.9, help="discount")
    p.add_argument("--value-weight", type=float, default=0.1, help="value-loss weight")
    p.add_argument("--entropy-weight", type=float, default=0.03, help="entropy-term weight")
    p.add_argument("--entropy", choices=["sumsq", "entropy"], default="sumsq",
                   help="entropy term: sum of squared action probabilities (original) or -entropy")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--report", action="store_true", help="only plot and summarise the runs found in --out")
    return p


def parse_args(argv=None):
    args = parser().parse_args(argv)
    args.seeds = args.seeds or [args.seed]
    return args


def run_one(kind: str, seed: int, args, progress=harness.no_progress) -> dict:
    """Train one model with one seed; returns its reward curve and cumulative CPU seconds."""
    device = torch.device(args.device)
    torch.manual_seed(seed)
    agent = make_agent(kind, hidden_size=args.hidden, meta_hidden=args.meta_hidden, gate=args.gate).to(device)
    model = warp_agent(agent, kind)
    if WARP_MODULES[kind] is not None:
        # The "four lines" on top of the standard script: warp() above, this optimizer, and the
        # continual algorithm; opt.step() below then also accumulates and applies warp updates.
        opt = warpopt.WarpGradMetaOptimizer(
            model, lr=args.lr, task_optimizer=torch.optim.Adam, meta_lr=args.meta_lr,
            algorithm=warpopt.continual(every=args.warp_every), initialisation=warpopt.none())
        clipped = list(model.adapt_parameters())
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        clipped = list(model.parameters())
    env = MazeVectorEnv(args.batch, size=args.size, episode_length=args.episode_length)
    env.reset(seed=1_000_003 * seed)
    rng = np.random.default_rng(seed)
    marks = set(np.linspace(1, args.episodes, min(CHECKPOINTS, args.episodes)).round().astype(int).tolist())
    curve, cpu_at, watch = [], {}, harness.Stopwatch()
    for it in range(args.episodes):
        with watch:
            loss, rewards = run_episodes(agent, env, rng, device, gamma=args.gamma, value_weight=args.value_weight,
                                         entropy_weight=args.entropy_weight, entropy=args.entropy)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clipped, args.clip)
            opt.step()
        curve.append(float(rewards.mean()))
        if it + 1 in marks:
            cpu_at[it + 1] = watch.cpu
        if (it + 1) % 10 == 0:
            progress(10)
    progress(args.episodes % 10)
    out = {"model": kind, "seed": seed, "episodes": args.episodes, "size": args.size,
           "seconds": watch.wall, "cpu_seconds": watch.cpu, "cpu_seconds_at": cpu_at, "reward": curve}
    if hasattr(opt, "counters"):
        out["counters"] = dict(opt.counters)
    return out


def _run_job(job, progress):
    kind, seed, args = job
    return run_one(kind, seed, args, progress)


def run_path(args, kind, seed):
    return os.path.join(args.out, "runs", f"{kind}_size{args.size}_seed{seed}.json")


def train(args):
    jobs = [(k, s, args) for s in args.seeds for k in args.model]
    for result in harness.run_parallel(_run_job, jobs, workers=args.workers, threads=args.threads or 1,
                                       total=len(jobs) * args.episodes, desc="maze", unit="upd"):
        result["config"] = {k: v for k, v in harness.values(args).items() if k != "report"}
        harness.write_json(os.path.dirname(run_path(args, result["model"], result["seed"])),
                           os.path.basename(run_path(args, result["model"], result["seed"])), result)


def equal_time(run: dict, reference: dict, window: int) -> dict | None:
    """``run``'s smoothed reward when it has used the CPU time of ``reference``'s whole training.

    The iteration is read off ``run``'s cumulative CPU seconds (recorded at evenly spaced
    iterations, linearly interpolated); None when ``run`` is the cheaper of the two.
    """
    marks = sorted((int(k), v) for k, v in run["cpu_seconds_at"].items())
    budget = reference["cpu_seconds"]
    if budget >= marks[-1][1]:
        return None
    its, cpu = np.array([0] + [m for m, _ in marks]), np.array([0.0] + [c for _, c in marks])
    k = max(1, int(np.interp(budget, cpu, its)))
    return {"iteration": k, "reward": float(harness.smooth(run["reward"], window)[k - 1]),
            "reference_reward": float(harness.smooth(reference["reward"], window)[-1]), "cpu_seconds": budget}


def report(args):
    runs = []
    for path in sorted(glob.glob(os.path.join(args.out, "runs", "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    if not runs:
        print(f"no runs in {args.out}/runs")
        return {}
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["model"], r["size"], r["episodes"]), []).append(r)
    summary = {}
    plt = harness.pyplot()
    sizes = sorted({k[1] for k in groups})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.5), squeeze=False)
    for (kind, size, episodes), rs in sorted(groups.items()):
        curves = np.array([r["reward"] for r in rs])
        window = max(1, episodes // 20)
        sm = np.array([harness.smooth(c, window) for c in curves])
        x = np.arange(1, episodes + 1)
        ax = axes[0, sizes.index(size)]
        ax.plot(x, curves.mean(0), color=COLOURS.get(kind), alpha=0.2, lw=0.7)  # raw mean over seeds, faint
        ax.plot(x, sm.mean(0), color=COLOURS.get(kind), label=f"{kind} ({len(rs)} seeds)")
        ax.fill_between(x, np.percentile(sm, 25, 0), np.percentile(sm, 75, 0), color=COLOURS.get(kind), alpha=0.2)
        ax.set_title(f"maze {size}x{size}")
        checkpoints = sorted({max(1, episodes * q // 4) for q in (1, 2, 3, 4)})
        entry = {"seeds": [r["seed"] for r in rs], "window": window,
                 "mean_reward_all_episodes": _stats(curves.mean(1)),
                 "seconds_per_run": float(np.mean([r["seconds"] for r in rs])),
                 "cpu_seconds_per_run": float(np.mean([r.get("cpu_seconds", np.nan) for r in rs]))}
        for cp in checkpoints:  # mean episode reward over the `window` iterations ending at cp
            entry[f"reward_at_{cp}"] = _stats(sm[:, cp - 1])
        summary[f"{kind}/size{size}/episodes{episodes}"] = entry
    for (kind, size, episodes), rs in sorted(groups.items()):  # paired by seed against the plain RNN
        base = {r["seed"]: r for r in groups.get(("rnn", size, episodes), [])}
        paired = [np.mean(r["reward"]) - np.mean(base[r["seed"]]["reward"]) for r in rs if r["seed"] in base]
        if kind == "rnn" or not paired:
            continue
        entry = summary[f"{kind}/size{size}/episodes{episodes}"]
        entry["vs_rnn_same_seed"] = {"seeds": len(paired), "wins": int(sum(d > 0 for d in paired)),
                                     "mean_difference_all_episodes": float(np.mean(paired))}
        window = entry["window"]
        timed = [(r["seed"], equal_time(r, base[r["seed"]], window)) for r in rs
                 if r["seed"] in base and "cpu_seconds_at" in r]
        timed = [(s, t) for s, t in timed if t is not None]
        if timed:  # the RNN's whole training time, spent by the (slower) model
            entry["vs_rnn_equal_time"] = {
                "comparison": "at equal training time: this model's smoothed reward at the iteration where its "
                              "CPU time equals the RNN's total (same seed), vs the RNN's at its last iteration",
                "seeds": len(timed), "iteration_mean": float(np.mean([t["iteration"] for _, t in timed])),
                "rnn_cpu_seconds_mean": float(np.mean([t["cpu_seconds"] for _, t in timed])),
                "reward": _stats([t["reward"] for _, t in timed]),
                "rnn_reward": _stats([t["reference_reward"] for _, t in timed]),
                "wins": int(sum(t["reward"] > t["reference_reward"] for _, t in timed))}
    for ax in axes[0]:
        ax.set_xlabel("Number of Episodes (training iterations of 30 episodes)")
        ax.set_ylabel(f"Reward (trailing mean over {max(1, max(k[2] for k in groups) // 20)} iterations; raw faint)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "maze_rewards.png"), dpi=120)
    plt.close(fig)
    harness.write_json(args.out, "results.json", summary)
    for key, entry in summary.items():
        cps = " ".join(f"{k[10:]}:{v['mean']:.1f}" for k, v in entry.items() if k.startswith("reward_at_"))
        print(f"{key:36s} seeds={len(entry['seeds'])} reward (mean over seeds) at {cps}; "
              f"all-episode mean {entry['mean_reward_all_episodes']['mean']:.2f}; "
              f"{entry['cpu_seconds_per_run']:.0f} CPU s per run")
        if "vs_rnn_same_seed" in entry:
            v = entry["vs_rnn_same_seed"]
            print(f"{'':36s} vs rnn at equal iterations, same seeds: higher all-episode mean on {v['wins']}/{v['seeds']} "
                  f"seeds, mean difference {v['mean_difference_all_episodes']:+.2f}")
        if "vs_rnn_equal_time" in entry:
            v = entry["vs_rnn_equal_time"]
            print(f"{'':36s} vs rnn at equal training time ({v['rnn_cpu_seconds_mean']:.0f} CPU s = iteration "
                  f"{v['iteration_mean']:.0f}): reward {v['reward']['mean']:.1f} vs {v['rnn_reward']['mean']:.1f}, "
                  f"higher on {v['wins']}/{v['seeds']} seeds")
    return summary


def _stats(v: np.ndarray) -> dict:
    v = np.asarray(v, dtype=float)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "q25": float(np.percentile(v, 25)),
            "q75": float(np.percentile(v, 75)), "per_seed": [round(float(a), 3) for a in v]}


def main(argv=None):
    args = parse_args(argv)
    harness.start(args)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    if not args.report:
        harness.write_config(args, NOTES)
        train(args)
    return report(args)


if __name__ == "__main__":
    harness.cli(main)
