"""Recording overhead: wall time of a task loop with trajectory recording / a plain torch SGD loop.

Omniglot learner (4 × 64-filter conv + BatchNorm, warped), 28×28 inputs, batch 20, 100 steps
(``--quick``: 20). Variants, each timed side by side with the plain loop in every repeat
(medians of the per-repeat ratios):
  record          WarpGradMetaOptimizer step + recording (offline, no θ0 learner)
  record+leap     the default (Leap θ0 learner: one probe forward and a parameter copy per step)
  record fp16     recording in half precision
  record every 5  recording every 5th step
Target: record / plain ≤ 1.10.
"""
import sys
import os

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import warpopt  # noqa: E402
from _common import adapt_task, machine, median, parser, setup, synthetic_task, timed, warped_omniglot  # noqa: E402

p = parser(__doc__)
p.add_argument("--steps", type=int, default=100)
p.add_argument("--batch", type=int, default=20)
p.add_argument("--quick", action="store_true", help="20 steps, 3 repeats")
args = p.parse_args()
if args.quick:
    args.steps, args.repeats = 20, 3
device = setup(args)
model = warped_omniglot(device)
data = synthetic_task(device, batch=args.batch)
loss_fn = nn.functional.cross_entropy
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


def recorded(**kwargs):
    init = kwargs.pop("initialisation", warpopt.none())
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=init,
                                        replay=warpopt.ReplayBuffer(**kwargs))

    def run() -> None:
        adapt_task(opt, model, data, loss_fn, args.steps)
        assert len(opt.replay) > 0
        opt.replay.clear()

    return run


variants = {"record": recorded(), "record+leap": recorded(initialisation=warpopt.leap()),
            "record fp16": recorded(dtype=torch.float16), "record every 5": recorded(every=5)}
plain()  # warm-up
for run in variants.values():
    run()
ratios = {name: [] for name in variants}
plain_times = []
for _ in range(args.repeats):
    for name, run in variants.items():
        base = timed(plain, device)
        t = timed(run, device)
        plain_times.append(base)
        ratios[name].append(t / base)


def step_only(n: int = 100) -> tuple[float, float]:
    """Seconds per ``step()`` alone (gradients already in .grad, lr 0): plain SGD vs recorded."""
    x, y = data(0)
    loss_fn(model(x), y).backward()
    sgd = torch.optim.SGD(list(model.adapt_parameters()), lr=0.0)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.0, initialisation=warpopt.none())
    base = median([timed(lambda: [sgd.step() for _ in range(n)], device) / n for _ in range(args.repeats)])
    times = []
    for _ in range(args.repeats):
        with opt.task(data, loss_fn):
            for q in model.adapt_parameters():
                q.grad = torch.zeros_like(q)
            times.append(timed(lambda: [opt.step() for _ in range(n)], device) / n)
        opt.replay.clear()
    return base, median(times)


sgd_step, rec_step = step_only()
per_step = median(plain_times) / args.steps
print(f"recording overhead: {args.steps} steps, batch {args.batch}, device {device} ({machine(device)}), "
      f"{args.repeats} repeats")
print(f"plain SGD loop: median {median(plain_times):.3f} s ({1e3 * median(plain_times) / args.steps:.1f} ms/step)")
for name, rs in ratios.items():
    flag = "meets" if median(rs) <= 1.10 else "misses"
    print(f"{name:>15}: median ratio {median(rs):.3f}  (all: {', '.join(f'{r:.3f}' for r in rs)})"
          + (f"  [{flag} target ≤ 1.10]" if name == "record" else ""))
print(f"step() alone: plain SGD {1e3 * sgd_step:.3f} ms, recorded {1e3 * rec_step:.3f} ms -> extra "
      f"{1e3 * (rec_step - sgd_step):.3f} ms/step = {(rec_step - sgd_step) / per_step:.2%} of a plain step; "
      f"implied ratio {1 + (rec_step - sgd_step) / per_step:.3f}")
