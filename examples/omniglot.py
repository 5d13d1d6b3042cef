"""Multi-shot Omniglot (WarpGrad Section 4.1, Appendix E/F, Table 2/3, Fig. 6; the Leap protocol).

Every alphabet (first 20 characters) is a 20-way task; 10 alphabets chosen by the seed are held
out, meta-training uses the first N of the rest. A task adapts for 100 SGD steps on random,
augmented mini-batches; we report test accuracy on the held-out alphabets after 100 steps and the
AUC (mean over steps) of the training-accuracy curve, for Warp-Leap and the baselines, all through
the same harness and the same evaluation code.

    python examples/omniglot.py --quick                       # CPU check, Warp-Leap vs Leap vs SGD
    python examples/omniglot.py --quick --seeds 0 1 2
    python examples/omniglot.py --device cuda --seeds 0 1 2 3 4 5 6 7 8 9 --num-pretrain 25 \
        --meta-learner warp-leap leap reptile fomaml finetune sgd        # full protocol (GPU)
    python examples/omniglot_report.py runs/omniglot               # Table 2 / Fig. 6 from results

Choices (all recorded in config.json with their source):
- Fairness: the classifier head is reset to zero at the start of every task for every method
  (meta-training and held-out tasks alike); the original re-randomised it for the baselines only.
- Leap / Reptile / FOMAML run through the same WarpGradMetaOptimizer loop with their θ0 learner
  (``warpopt.leap(loss="probe")/reptile()/fomaml()``; Leap's ΔL on a probe batch, see OPT_METHODS)
  on a model whose warps are identity ``ScaleWarp``s that are never updated (algorithm ``FrozenWarp``); multi-headed fine-tuning trains the body with one
  head per meta-training alphabet for as many SGD steps as meta-training's task steps; ``sgd`` is
  no meta-training (random body, 10x batch size and learning rate).
- Meta optimizer: SGD, lr 0.1 for θ0 and φ (original implementation; online: 0.001, paper).
- Evaluation (identical for all methods): plain SGD from θ0 for 100 steps on the held-out
  alphabet, warps fixed; BatchNorm in train mode (batch statistics) also on the 100 un-augmented
  test images; AUC = mean training-batch accuracy over the 100 steps.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _parallel import no_progress, run_parallel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import warpopt
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    import warpopt
from warpopt.algorithms import Algorithm
from warpopt.data.omniglot import load_omniglot, multishot_split

DEFAULT_DATA = os.environ.get("WARPOPT_OMNIGLOT", str(ROOT.parent / "shared" / "data" / "omniglot"))
METHODS = ("warp-leap", "leap", "reptile", "fomaml", "finetune", "sgd")
# Leap's ΔL on a probe batch (one forward per step), not the default training losses: tasks draw
# a fresh random batch every step, so consecutive training losses differ by batch noise as much as
# by progress; the probe measures the change of one function. The figures in the README were
# measured with it.
OPT_METHODS = {"warp-leap": functools.partial(warpopt.leap, loss="probe"),
               "leap": functools.partial(warpopt.leap, loss="probe"), "reptile": warpopt.reptile,
               "fomaml": warpopt.fomaml}


def _conv_relu(c, d):
    return nn.Sequential(warpopt.ConvWarp(c, d), nn.ReLU())


#: --warp-layer choices: Table 3 rows (factories ``(channels, spatial_dims) -> module``).
WARP_LAYERS = {
    "conv": warpopt.ConvWarp,                                                  # 3x3 conv (default)
    "conv1x1": lambda c, d: warpopt.ConvWarp(c, d, kernel_size=1),
    "scale": warpopt.ScaleWarp,
    "conv-relu": _conv_relu,
    "conv-bn": warpopt.ConvBNWarp,
    "conv-bn-relu": lambda c, d: warpopt.ConvBNWarp(c, d, relu=True),
    "residual": warpopt.ResidualWarp,                                          # conv+BN+Res+ReLU
    "two-layer-residual": warpopt.TwoLayerResidualWarp,
    "two-layer-residual-ta": lambda c, d: warpopt.TwoLayerResidualWarp(c, d, task_film=True),
    "none": warpopt.ScaleWarp,  # baselines: an identity warp that is never meta-trained
}


class ConvBlock(nn.Module):
    """3x3 conv (64) -> 2x2 max-pool -> BatchNorm -> ReLU (Appendix E)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.norm = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.norm(self.pool(self.conv(x))))


class Learner(nn.Module):
    """Four conv blocks (28x28 -> 1x1x64) and a linear 20-way head."""

    def __init__(self, classes: int = 20, filters: int = 64, blocks: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(*[ConvBlock(1 if i == 0 else filters, filters) for i in range(blocks)])
        self.head = nn.Linear(filters, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FrozenWarp(Algorithm):
    """Plain θ0 meta-learning (Leap, Reptile, FOMAML): tasks reset to θ0, warps never updated."""

    def meta_step(self, opt):
        return {"warp_updates": 0}


def build_model(args, warp_layer: str, seed: int):
    torch.manual_seed(seed)
    net = Learner(filters=args.filters)
    model = warpopt.warp(net, where=ConvBlock, layer=WARP_LAYERS[warp_layer])
    with torch.no_grad():  # the head starts every task at zero (see module docstring)
        net.head.weight.zero_()
        net.head.bias.zero_()
    # channels-last: the CPU's oneDNN convolutions run the task loop ≈ 1.4x faster in it (measured,
    # 32 filters, 1 thread); values are the same up to float rounding.
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return net, model.to(args.device, memory_format=fmt)


def head_slots(model, net) -> list[int]:
    ids = {id(net.head.weight), id(net.head.bias)}
    return [i for i, p in enumerate(model.adapt_parameters()) if id(p) in ids]


def task_source(task, batch_size: int, gen: torch.Generator):
    """Fresh augmented batches ``k -> (x, y)``: the task loop and the meta-objectives both draw."""
    return lambda k=0: task.sample(batch_size, gen)


def meta_optimizer_factory(name: str):
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]


def meta_train(method, args, train_tasks, gen, timer, progress=no_progress):
    """Meta-train θ0 (and φ for Warp-Leap) with WarpGradMetaOptimizer; returns (model, θ0).

    ``progress(1)`` is called after every meta-step.
    """
    warp_layer = args.warp_layer if method == "warp-leap" else "none"
    net, model = build_model(args, warp_layer, args.run_seed)
    if method == "warp-leap":
        objective = warpopt.exact if args.objective == "exact" else warpopt.approx
        algorithm = (warpopt.offline(batch_size=args.replay_batch, max_updates=args.max_updates)
                     if args.algorithm == "offline" else warpopt.online())
    else:
        objective, algorithm = warpopt.exact, FrozenWarp()
    replay = warpopt.ReplayBuffer(generator=torch.Generator().manual_seed(args.run_seed))
    opt = warpopt.WarpGradMetaOptimizer(
        model, lr=args.inner_lr, meta_lr=args.meta_lr, init_lr=args.init_lr, objective=objective,
        algorithm=algorithm, initialisation=OPT_METHODS[method](), replay=replay,
        meta_optimizer=meta_optimizer_factory(args.meta_optimizer))
    heads = head_slots(model, net)
    meta_batch = min(args.meta_batch, len(train_tasks))
    rng = random.Random(args.run_seed)
    for _ in range(args.meta_steps):
        for i in rng.sample(range(len(train_tasks)), meta_batch):
            with torch.no_grad():
                for j in heads:
                    opt.theta0[j].zero_()
            data = task_source(train_tasks[i], args.batch_size, gen)
            t0 = time.process_time()
            with opt.task(data, F.cross_entropy):
                for k in range(args.steps):
                    x, y = data(k)
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
            timer["task_steps"] += args.steps
            timer["task_s"] += time.process_time() - t0
        t0, before = time.process_time(), opt.counters["warp_updates"]
        opt.meta_step()
        timer["replayed"] += (opt.counters["warp_updates"] - before) * args.replay_batch
        timer["meta_s"] += time.process_time() - t0
        progress(1)
    with torch.no_grad():
        for j in heads:
            opt.theta0[j].zero_()
    return model, [t.detach().clone() for t in opt.theta0]


def multihead_pretrain(args, train_tasks, gen, timer, progress=no_progress):
    """Multi-headed fine-tuning baseline: train the body on all N tasks, one head per task.

    Trains for as many SGD steps as meta-training's task steps; ``progress(1)`` per meta-step's worth.
    """
    net, model = build_model(args, "none", args.run_seed)
    heads = nn.ModuleList([nn.Linear(args.filters, 20) for _ in train_tasks]).to(args.device)
    for h in heads:
        nn.init.zeros_(h.weight)
        nn.init.zeros_(h.bias)
    body = [p for p in model.adapt_parameters() if id(p) not in {id(net.head.weight), id(net.head.bias)}]
    opt = torch.optim.SGD(body + list(heads.parameters()), lr=args.inner_lr)
    for p in model.warp_parameters():
        p.requires_grad_(False)
    rng = random.Random(args.run_seed)
    per_meta_step = min(args.meta_batch, len(train_tasks)) * args.steps
    budget = args.meta_steps * per_meta_step  # = meta-training's task steps
    t0 = time.perf_counter()
    for step in range(budget):
        i = rng.randrange(len(train_tasks))
        x, y = train_tasks[i].sample(args.batch_size, gen)
        opt.zero_grad()
        F.cross_entropy(heads[i](net.features(x)), y).backward()
        opt.step()
        if (step + 1) % per_meta_step == 0:
            progress(1)
    timer["task_steps"] += budget
    timer["task_s"] += time.perf_counter() - t0
    theta0 = [p.detach().clone() for p in model.adapt_parameters()]
    for j in head_slots(model, net):
        theta0[j].zero_()
    return model, theta0


def evaluate(model, theta0, tasks, batch_size, lr, steps, gen):
    """Adapt from θ0 with plain SGD on each task (warps fixed); same code for every method.

    Returns per-task test accuracy after ``steps`` and per-step training-batch accuracy.
    BatchNorm uses batch statistics (train mode) throughout, also on the 100 test images.
    """
    test_acc, curves = [], []
    for task in tasks:
        m = copy.deepcopy(model)
        adapt = list(m.adapt_parameters())
        with torch.no_grad():
            for p, t in zip(adapt, theta0):
                p.copy_(t)
        for p in m.warp_parameters():
            p.requires_grad_(False)
        opt = torch.optim.SGD(adapt, lr=lr)
        m.train()
        curve = []
        for _ in range(steps):
            x, y = task.sample(batch_size, gen)
            out = m(x)
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
            opt.step()
            curve.append((out.argmax(1) == y).float().mean())
        with torch.no_grad():
            out = m(task.test_images)
            test_acc.append((out.argmax(1) == task.test_labels).float().mean().item())
        curves.append(torch.stack(curve).tolist())
    return test_acc, curves


def run(method, args, data, progress=no_progress):
    """One (method, N, seed) run: meta-train (unless sgd) and evaluate on the held-out alphabets.

    Calls ``progress(n)`` with ``job_units(method, args)`` units in all.
    """
    train_tasks, test_tasks = multishot_split(data, seed=args.run_seed, num_pretrain=args.num_pretrain)
    test_tasks = test_tasks[: args.num_eval_tasks]
    gen = torch.Generator().manual_seed(args.run_seed)
    timer = {"task_steps": 0, "task_s": 0.0, "replayed": 0, "meta_s": 0.0}  # CPU (process) seconds
    start, cpu_start = time.perf_counter(), time.process_time()
    if method in OPT_METHODS and args.num_pretrain > 0:
        model, theta0 = meta_train(method, args, train_tasks, gen, timer, progress)
    elif method == "finetune" and args.num_pretrain > 0:
        model, theta0 = multihead_pretrain(args, train_tasks, gen, timer, progress)
    else:  # no meta-training: SGD from a random initialisation
        _, model = build_model(args, "none", args.run_seed)
        theta0 = [p.detach().clone() for p in model.adapt_parameters()]
    scale = args.sgd_scale if method == "sgd" else 1
    eval_gen = torch.Generator().manual_seed(10_000 + args.run_seed)  # same batches for every method
    t0 = time.perf_counter()
    acc, curves = evaluate(model, theta0, test_tasks, args.batch_size * scale, args.inner_lr * scale,
                           args.eval_steps, eval_gen)
    eval_s = time.perf_counter() - t0
    progress(1)
    mean_curve = torch.tensor(curves).mean(0).tolist()
    return {
        "method": method, "seed": args.run_seed, "num_pretrain": args.num_pretrain,
        "warp_layer": args.warp_layer if method == "warp-leap" else None,
        "algorithm": args.algorithm if method == "warp-leap" else None,
        "objective": args.objective if method == "warp-leap" else None,
        "test_acc": sum(acc) / len(acc), "train_auc": sum(mean_curve) / len(mean_curve),
        "test_acc_per_task": dict(zip([t.name for t in test_tasks], acc)),
        "train_curve": mean_curve, "meta_steps": args.meta_steps, "quick": args.quick,
        "time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start, "eval_s": eval_s, **timer,
    }


def job_units(method: str, args) -> int:
    """Progress units of one run: its meta-steps (none without meta-training) and the evaluation."""
    return (args.meta_steps if method != "sgd" and args.num_pretrain > 0 else 0) + 1


#: rough relative cost of a run, so that the slowest start first when runs go in parallel
COST = {"warp-leap": 3, "leap": 1, "reptile": 1, "fomaml": 1, "finetune": 1, "sgd": 0}


@functools.lru_cache(maxsize=2)
def _load(path: str, cache_dir: str, device: str):
    return load_omniglot(path, image_size=28, cache_dir=cache_dir).to(device)


def _run_job(job, progress):
    method, seed, args = job
    args = copy.copy(args)
    args.run_seed = seed
    return run(method, args, _load(args.data, args.cache_dir, args.device), progress)


def run_all(args):
    """Yield the result of every (method, seed) run, ``args.workers`` processes at a time
    (slowest methods first); a run's result does not depend on the number of workers."""
    jobs = sorted(((m, s, args) for s in args.seeds for m in args.meta_learner), key=lambda j: -COST[j[0]])
    if args.threads:  # for runs in this process (one job, or --workers 1)
        torch.set_num_threads(args.threads)
    yield from run_parallel(_run_job, jobs, workers=args.workers, threads=args.threads or 1,
                            total=sum(job_units(m, args) for m, _, _ in jobs), desc="omniglot")


# Meta-training tasks run the full 100 steps that evaluation runs: with 50 (and 160 meta-steps in the
# same time) Warp-Leap's held-out training accuracy flattened after ~40 steps (seed 0: 60.8 vs 64.4 %).
QUICK = dict(num_pretrain=25, filters=32, meta_steps=105, meta_batch=2, max_updates=50, num_eval_tasks=10,
             workers=2)
SOURCES = {
    "steps": "paper/original (100 task steps)", "eval_steps": "paper/original (100)",
    "batch_size": "paper ablation (20; original default 128)", "filters": "paper (64)", "inner_lr": "original (SGD 0.1)",
    "meta_batch": "original (20 tasks)", "meta_steps": "original (1000)",
    "meta_optimizer": "original (SGD)", "meta_lr": "original (0.1, warp parameters)",
    "init_lr": "original (0.1, θ0)", "replay_batch": "paper (η = 1)",
    "max_updates": "paper (up to 2000 = all points; None)", "objective": "paper (exact, Eq. 7)",
    "algorithm": "paper (offline, Algorithm 2)", "warp_layer": "paper (3x3 conv)",
    "sgd_scale": "paper (10x batch and lr for no meta-training)", "num_eval_tasks": "paper (10)",
    "head": "ours: zero-initialised at every task for every method",
    "channels_last": "ours: memory format only (speed), not a protocol choice",
    "quick": f"ours: overrides {QUICK} for a 2-core CPU",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meta-learner", nargs="+", default=["warp-leap", "leap", "sgd"], choices=METHODS)
    p.add_argument("--num-pretrain", type=int, default=25, help="N meta-training alphabets")
    p.add_argument("--warp-layer", default="conv", choices=[k for k in WARP_LAYERS if k != "none"])
    p.add_argument("--objective", default="exact", choices=["exact", "approx"])
    p.add_argument("--algorithm", default="offline", choices=["offline", "online"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", help="several seeds in one call (overrides --seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help=f"2-core CPU mode: {QUICK}")
    p.add_argument("--out", default=str(ROOT / "runs" / "omniglot"))
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / ".cache"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--filters", type=int, default=64, help="conv filters per block (paper: 64)")
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--meta-batch", type=int, default=20)
    p.add_argument("--meta-steps", type=int, default=1000)
    p.add_argument("--meta-optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--meta-lr", type=float, default=None, help="warp lr (default 0.1; 0.001 online)")
    p.add_argument("--init-lr", type=float, default=0.1)
    p.add_argument("--replay-batch", type=int, default=1)
    p.add_argument("--max-updates", type=int, default=None)
    p.add_argument("--sgd-scale", type=int, default=10)
    p.add_argument("--num-eval-tasks", type=int, default=10)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="conv weights in channels-last memory format (faster convolutions; default on)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default: torch's; 1 per worker when --workers > 1)")
    p.add_argument("--workers", type=int, default=1, help="runs (method, seed) in parallel processes")
    p.add_argument("--gpu-speedup", type=float, default=10.0,
                   help="assumed GPU/2-core-CPU speed ratio for the printed wall-time estimate")
    known, _ = p.parse_known_args(argv)
    if known.quick:
        p.set_defaults(**QUICK)  # explicit flags still win
    args = p.parse_args(argv)
    if args.meta_lr is None:
        args.meta_lr = 1e-3 if args.algorithm == "online" else 0.1
    args.seeds = args.seeds or [args.seed]
    return args


def estimate(args, rows):
    """Extrapolate the full protocol (1000 meta-steps, 20 tasks, 2000 replays) from measured costs."""
    if args.filters != 64:  # costs measured on a narrower net would underestimate the paper's
        print("(no full-protocol estimate: it needs costs measured with --filters 64)")
        return None
    step = [r["task_s"] / r["task_steps"] for r in rows if r["method"] == "warp-leap" and r["task_steps"]]
    replay = [r["meta_s"] / r["replayed"] for r in rows if r["method"] == "warp-leap" and r["replayed"]]
    if not step or not replay:
        return None
    cpu = 1000 * 20 * 100 * (sum(step) / len(step)) + 1000 * 2000 * (sum(replay) / len(replay))
    return {"cpu_task_step_s": sum(step) / len(step), "cpu_replay_point_s": sum(replay) / len(replay),
            "cpu_hours_per_run": cpu / 3600, "gpu_hours_per_run_estimate": cpu / 3600 / args.gpu_speedup}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    config["sources"] = SOURCES
    (out / "config.json").write_text(json.dumps(config, indent=2))
    results_file = out / "results.json"
    rows = json.loads(results_file.read_text())["runs"] if results_file.exists() else []
    key = lambda r: (r["method"], r["num_pretrain"], r["seed"], r["warp_layer"], r.get("algorithm"),  # noqa: E731
                     r.get("objective"), r.get("quick"))
    new = []
    for row in run_all(args):
        new.append(row)
        rows = [r for r in rows if key(r) != key(row)] + [row]
        results_file.write_text(json.dumps({"runs": rows}, indent=1))
        tqdm.write(f"seed {row['seed']} {row['method']:9s} N={args.num_pretrain}: test acc "
                   f"{100 * row['test_acc']:.1f}%  train AUC {row['train_auc']:.3f}  ({row['time_s']:.0f} s)")
    for method in args.meta_learner:
        accs = [100 * r["test_acc"] for r in new if r["method"] == method]
        sd = torch.tensor(accs).std().item() if len(accs) > 1 else 0.0
        print(f"{method:9s}: {sum(accs) / len(accs):.1f} ± {sd:.1f} over seeds {args.seeds}")
    est = estimate(args, new)
    if est:
        (out / "estimate.json").write_text(json.dumps(est, indent=2))
        print(f"Full protocol, one seed (ESTIMATE from measured CPU process time: task step "
              f"{1000 * est['cpu_task_step_s']:.0f} ms, exact replay {1000 * est['cpu_replay_point_s']:.0f} ms; "
              f"GPU assumed {args.gpu_speedup:.0f}x faster): ~{est['cpu_hours_per_run']:.0f} h on this CPU, "
              f"~{est['gpu_hours_per_run_estimate']:.1f} h on a GPU per method and N.\n  python examples/omniglot.py"
              " --device cuda --num-pretrain 25 --seeds 0 1 2 3 --meta-learner warp-leap leap reptile fomaml "
              "finetune sgd")
    try:
        from omniglot_report import report
    except ImportError:
        from examples.omniglot_report import report
    report([out], out)


if __name__ == "__main__":
    main()
