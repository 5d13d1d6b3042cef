"""Maze navigation with a Warp-RNN (WarpGrad paper, Section 4.2 (c.1), Appendix I, Fig. 3/9).

An advantage actor-critic RNN learns to find a goal in a maze, return to it after each teleport,
and, across episodes (each with a new goal), to explore. The Warp-RNN modulates the task RNN
with a meta-LSTM warp layer that is frozen during task updates and meta-learned with the
continual algorithm (Algorithm 3, approximate objective Eq. 8 harvested from the A2C backward,
warp update every 30th task update). Baselines in the same harness: the plain RNN, a HyperRNN
(the meta-LSTM trained at every update) and a T-Nets-RNN (linear warps T_h, T_x, T_b).

"Episodes" (``--episodes``, the plot's x-axis) count training iterations as the paper's Fig. 3/9
do: each one is a batch of 30 parallel 200-step episodes and one A2C update.

    # quick comparison on 2 CPU cores (about 11 minutes), then the plot:
    python examples/maze.py --quick
    # the paper's protocol (200 000 updates x 10 seeds, all models; GPU):
    python examples/maze.py --model warp-rnn rnn hyper-rnn tnets-rnn --seeds 0 1 2 3 4 5 6 7 8 9 \
        --episodes 200000 --size 11 --device cuda
    # re-plot everything found in the out dir:
    python examples/maze.py --report
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import warpopt  # noqa: E402
from warpopt.envs.maze import MazeVectorEnv  # noqa: E402
from warpopt.rnn import MODELS, WARP_MODULES, make_agent, run_episodes, warp_agent  # noqa: E402
from _parallel import no_progress, run_parallel  # noqa: E402

COLOURS = {"warp-rnn": "tab:red", "rnn": "tab:blue", "hyper-rnn": "tab:green", "tnets-rnn": "tab:purple"}
SOURCES = {
    "size": "paper text: 11 (original code / Backpropamine: 13; Miconi et al. 2019: 9); quick: ours",
    "episode_length": "paper", "batch_episodes": "paper (30)", "hidden": "paper (100)",
    "meta_hidden": "original implementation (LSTMCell 117->100)", "gamma": "original implementation (0.9)",
    "value_weight": "original implementation (0.1)",
    "entropy_weight": "original implementation (0.03)",
    "entropy": "original implementation: sum of squared action probabilities as the penalty",
    "clip": "original implementation (4.0, on the task parameters' gradient norm)",
    "lr": "paper (Adam 1e-3)", "meta_lr": "original implementation (Adam 1e-3)",
    "warp_every": "paper (30); quick: 5 (80 warp updates in 400 task updates)",
    "gate": "ours: U = 1 + tanh(Pz), P zero-init (paper: tanh(Pz)); see warpopt/rnn.py",
    "episodes": "paper: 200 000 training iterations; quick: ours",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=MODELS, default=None, help="one or more models")
    p.add_argument("--episodes", type=int, default=None, help="training iterations (batches of 30 episodes)")
    p.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=None)
    p.add_argument("--size", type=int, default=None, help="maze side (odd)")
    p.add_argument("--episode-length", type=int, default=200)
    p.add_argument("--batch", type=int, default=30, help="parallel episodes per update")
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--meta-hidden", type=int, default=100)
    p.add_argument("--gate", choices=["shifted", "paper"], default="shifted")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--warp-every", type=int, default=None, help="task updates per warp update (paper: 30)")
    p.add_argument("--clip", type=float, default=4.0)
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--value-weight", type=float, default=0.1)
    p.add_argument("--entropy-weight", type=float, default=0.03)
    p.add_argument("--entropy", choices=["sumsq", "entropy"], default="sumsq")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--quick", action="store_true",
                   help="CPU mode: warp-rnn vs rnn, 10 seeds, a 9x9 maze, 400 updates, warp update every 5th, "
                        "2 workers (about 11 min on 2 cores)")
    p.add_argument("--report", action="store_true", help="only plot/summarise the runs found in --out")
    p.add_argument("--out", default="runs/maze")
    args = p.parse_args(argv)
    # Quick mode compresses 200 000 updates into 400: a warp update every 5th task update gives the
    # meta-LSTM 80 updates instead of 13, so the warp has a chance to act within the budget.
    quick = {"model": ["warp-rnn", "rnn"], "episodes": 400, "seeds": list(range(10)), "size": 9,
             "warp_every": 5}
    full = {"model": ["warp-rnn"], "episodes": 200_000, "seeds": [0], "size": 11, "warp_every": 30}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.workers == 1:
        args.workers = 2
    return args


def run_one(kind: str, seed: int, args: argparse.Namespace, progress=no_progress) -> dict:
    """Train one model with one seed; returns its reward curve."""
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
    curve, start, cpu = [], time.time(), time.process_time()
    for it in range(args.episodes):
        loss, rewards = run_episodes(agent, env, rng, device, gamma=args.gamma, value_weight=args.value_weight,
                                     entropy_weight=args.entropy_weight, entropy=args.entropy)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clipped, args.clip)
        opt.step()
        curve.append(float(rewards.mean()))
        if (it + 1) % 10 == 0:
            progress(10)
    progress(args.episodes % 10)
    out = {"model": kind, "seed": seed, "episodes": args.episodes, "size": args.size,
           "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu, "reward": curve}
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
    for result in run_parallel(_run_job, jobs, workers=args.workers, threads=args.threads,
                               total=len(jobs) * args.episodes, desc="maze", unit="upd"):
        save_run(args, result)


def save_run(args, result):
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("report",)}
    with open(run_path(args, result["model"], result["seed"]), "w") as f:
        json.dump(result, f)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean (window shrinks at the start)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({k[1] for k in groups})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.5), squeeze=False)
    for (kind, size, episodes), rs in sorted(groups.items()):
        curves = np.array([r["reward"] for r in rs])
        window = max(1, episodes // 20)
        sm = np.array([smooth(c, window) for c in curves])
        x = np.arange(1, episodes + 1)
        ax = axes[0, sizes.index(size)]
        ax.plot(x, sm.mean(0), color=COLOURS.get(kind), label=f"{kind} ({len(rs)} seeds)")
        ax.fill_between(x, np.percentile(sm, 25, 0), np.percentile(sm, 75, 0), color=COLOURS.get(kind), alpha=0.2)
        ax.set_title(f"maze {size}x{size}")
        checkpoints = sorted({max(1, episodes * q // 4) for q in (1, 2, 3, 4)})
        entry = {"seeds": [r["seed"] for r in rs], "window": window,
                 "mean_reward_all_episodes": _stats(curves.mean(1)),
                 "seconds_per_run": float(np.mean([r["seconds"] for r in rs]))}
        for cp in checkpoints:  # mean episode reward over the `window` iterations ending at cp
            entry[f"reward_at_{cp}"] = _stats(sm[:, cp - 1])
        summary[f"{kind}/size{size}/episodes{episodes}"] = entry
    for (kind, size, episodes), rs in sorted(groups.items()):  # paired by seed against the plain RNN
        base = {r["seed"]: np.mean(r["reward"]) for r in groups.get(("rnn", size, episodes), [])}
        paired = [np.mean(r["reward"]) - base[r["seed"]] for r in rs if r["seed"] in base]
        if kind != "rnn" and paired:
            summary[f"{kind}/size{size}/episodes{episodes}"]["vs_rnn_same_seed"] = {
                "seeds": len(paired), "wins": int(sum(d > 0 for d in paired)),
                "mean_difference_all_episodes": float(np.mean(paired))}
    for ax in axes[0]:
        ax.set_xlabel("Number of Episodes (training iterations of 30 episodes)")
        ax.set_ylabel("Reward")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "maze_rewards.png"), dpi=120)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for key, entry in summary.items():
        cps = " ".join(f"{k[10:]}:{v['mean']:.1f}" for k, v in entry.items() if k.startswith("reward_at_"))
        print(f"{key:36s} seeds={len(entry['seeds'])} reward (mean over seeds) at {cps}; "
              f"all-episode mean {entry['mean_reward_all_episodes']['mean']:.2f}")
        if "vs_rnn_same_seed" in entry:
            v = entry["vs_rnn_same_seed"]
            print(f"{'':36s} vs rnn, same seeds: higher all-episode mean on {v['wins']}/{v['seeds']} seeds, "
                  f"mean difference {v['mean_difference_all_episodes']:+.2f}")
    return summary


def _stats(v: np.ndarray) -> dict:
    v = np.asarray(v, dtype=float)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "q25": float(np.percentile(v, 25)),
            "q75": float(np.percentile(v, 75)), "per_seed": [round(float(a), 3) for a in v]}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    if not args.report:
        config = {"args": vars(args), "sources": SOURCES}
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        torch.set_num_threads(args.threads)
        train(args)
    report(args)


if __name__ == "__main__":
    main()
