"""Recording overhead: a task loop under ``WarpGradMetaOptimizer`` against a plain torch SGD loop.

Two learners, batch 20, ``--steps`` task steps (default 50), warp parameters frozen as during
adaptation:
  omniglot  the multi-shot Omniglot net (4 × 64-filter conv + BatchNorm, default warps;
            |θ| = 113,236), 28×28 inputs
  mlp       784-1024-1024-10 ReLU MLP with the default (linear) warps: |θ| = 1,863,690
Contenders, interleaved with the plain loop in every repeat (medians of per-repeat ratios):
  record            offline recording, no θ0 learner (``initialisation=warpopt.none()``)
  record+leap       recording + Leap, the default ``warpopt.leap()``: ΔL from the loop's own training
                    losses (``loss="train"``: read off the loop's forward, no extra forward)
  record+leap(probe) recording + ``warpopt.leap(loss="probe")``: ΔL on a probe batch, a forward per step
  record+leap(noL)  recording + ``warpopt.leap(loss_term=False)`` (path length in θ only)
  record fp16 / record every 5   (``--variants``: half-precision storage, every 5th step)
  record+check      (``--variants``) a task whose first step is checked (issue 14: tasks 0, 1, 2, 4, 8, ...);
                    every other contender times unchecked tasks, as nearly all tasks of a run are
Targets (issue 18): record ≤ 1.05, record + Leap ≤ 1.10. Also printed: ``step()`` alone
(gradients already in place) plain SGD vs recorded, per step.

    python benchmarks/recording_overhead.py             # 9 repeats: 4.5 min on the loaded 2-core VM
    python benchmarks/recording_overhead.py --device cuda
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import warpopt  # noqa: E402
from _common import (adapt_task, count, interleaved, load_average, machine, median, mlp, parser, ratio,  # noqa: E402
                     setup, synthetic_task, timed, warped_omniglot)

VARIANTS = {
    "record": dict(initialisation=warpopt.none),
    "record+leap": dict(initialisation=lambda: warpopt.leap(loss="train")),
    "record+leap(probe)": dict(initialisation=lambda: warpopt.leap(loss="probe")),
    "record+leap(noL)": dict(initialisation=lambda: warpopt.leap(loss_term=False)),
    "record fp16": dict(initialisation=warpopt.none, dtype=torch.float16),
    "record every 5": dict(initialisation=warpopt.none, every=5),
    "record+check": dict(initialisation=warpopt.none, checked=True),
}
TARGETS = {"record": 1.05, "record+leap": 1.10, "record+leap(noL)": 1.10}

p = parser(__doc__)
p.add_argument("--steps", type=int, default=50)
p.add_argument("--batch", type=int, default=20)
p.add_argument("--models", default="omniglot,mlp")
p.add_argument("--variants", default="record,record+leap,record+leap(probe),record+leap(noL)",
               help="comma-separated subset of: " + ", ".join(VARIANTS))
args = p.parse_args()
device = setup(args)
loss_fn = nn.functional.cross_entropy


def learner(name: str):
    if name == "omniglot":
        return warped_omniglot(device), synthetic_task(device, batch=args.batch)
    if name == "mlp":
        return warpopt.warp(mlp()).to(device), synthetic_task(device, batch=args.batch, ways=10, shape=(784,))
    raise SystemExit(f"unknown model {name!r}: omniglot or mlp")


def contenders(model: nn.Module, data) -> dict:
    theta0 = [q.detach().clone() for q in model.adapt_parameters()]
    for q in model.warp_parameters():
        q.requires_grad_(False)  # as during adaptation under WarpGradMetaOptimizer

    def plain() -> None:
        with torch.no_grad():
            for q, t in zip(model.adapt_parameters(), theta0):
                q.copy_(t)
        sgd = torch.optim.SGD(list(model.adapt_parameters()), lr=0.1)
        for k in range(args.steps):
            x, y = data(k)
            sgd.zero_grad()
            loss_fn(model(x), y).backward()
            sgd.step()

    def recorded(initialisation, checked=False, **buffer):
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=initialisation(),
                                            replay=warpopt.ReplayBuffer(**buffer))

        def run() -> None:
            # Tasks 0, 1, 2, 4, 8, ... get issue 14's first-step check (one replayed step, ~log2 of
            # the tasks of a run): every timed task is an unchecked one, as nearly all are in training,
            # except under "record+check", which times the checked ones.
            opt.core.tasks_begun = 0 if checked else 3
            adapt_task(opt, model, data, loss_fn, args.steps)
            assert len(opt.replay) > 0
            opt.replay.clear()

        return run

    out = {"plain": plain}
    out.update({name: recorded(**VARIANTS[name]) for name in args.variants.split(",")})
    return out


def step_only(model: nn.Module, data, n: int = 20) -> tuple[float, float]:
    """Seconds per ``step()`` alone (gradients already in .grad, lr 0): plain SGD vs recorded."""
    x, y = data(0)
    loss_fn(model(x), y).backward()
    sgd = torch.optim.SGD(list(model.adapt_parameters()), lr=0.0)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.0, initialisation=warpopt.none())
    base = median([timed(lambda: [sgd.step() for _ in range(n)], device) / n for _ in range(args.repeats)])
    times = []
    for _ in range(args.repeats):
        opt.core.tasks_begun = 3  # an unchecked task (see ``recorded``)
        with opt.task(data, loss_fn):
            for q in model.adapt_parameters():
                q.grad = torch.zeros_like(q)
            times.append(timed(lambda: [opt.step() for _ in range(n)], device) / n)
        opt.replay.clear()
    return base, median(times)


print(f"recording overhead: {args.steps} steps, batch {args.batch}, device {device} ({machine(device)}), "
      f"{args.repeats} repeats", flush=True)
for name in args.models.split(","):
    model, data = learner(name)
    print(f"\n{name}: |θ| = {count(model.adapt_parameters()):,}, |φ| = {count(model.warp_parameters()):,}", flush=True)
    runs = contenders(model, data)
    times = interleaved(runs, args.repeats, device)
    per_step = median(times["plain"]) / args.steps
    print(f"{name} plain SGD loop: median {median(times['plain']):.3f} s ({1e3 * per_step:.1f} ms/step)")
    for variant in runs:
        if variant == "plain":
            continue
        r = ratio(times, variant, "plain")
        rs = ", ".join(f"{a / b:.3f}" for a, b in zip(times[variant], times["plain"]))
        target = TARGETS.get(variant)
        flag = f"  [{'meets' if r <= target else 'misses'} ≤ {target}]" if target else ""
        print(f"{name} {variant:>17} / plain: median {r:.3f}  (all: {rs}){flag}", flush=True)
    sgd_step, rec_step = step_only(model, data)
    print(f"{name} step() alone: plain SGD {1e3 * sgd_step:.3f} ms, recorded {1e3 * rec_step:.3f} ms -> extra "
          f"{1e3 * (rec_step - sgd_step):.3f} ms/step = {(rec_step - sgd_step) / per_step:.2%} of a plain step",
          flush=True)

print(f"load average at the end: {load_average()} (1/5/15 min)")
