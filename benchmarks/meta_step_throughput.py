"""Meta-step throughput: replayed samples per second, vectorised (vmap) vs the per-sample loop.

Omniglot learner (warped), one task adapted for K steps fills the buffer; for η ∈ {1, 8, 32}
the meta-gradient of η replayed points is computed by ``warpopt.objectives.meta_gradient``
(loop) and ``warpopt.vectorised.vectorised`` side by side in every repeat, for the exact
(Eq. 7) and approximate (Eq. 8) objectives. Target: vectorised ≥ 1.5× the loop at η = 32 (CPU).

    python benchmarks/meta_step_throughput.py                 # Omniglot net, about 4 minutes on one CPU thread
    python benchmarks/meta_step_throughput.py --model mlp     # the quickstart's sine MLP, under a minute
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import warpopt  # noqa: E402
from warpopt.objectives import meta_gradient  # noqa: E402
from warpopt.vectorised import vectorised  # noqa: E402
from _common import (interleaved, load_average, machine, median, parser, ratio, setup, synthetic_task,  # noqa: E402
                     warped_omniglot)

p = parser(__doc__)
p.add_argument("--etas", default="1,8,32")
p.add_argument("--chunk-size", type=int, default=None)
p.add_argument("--batch", type=int, default=20)
p.add_argument("--model", choices=["omniglot", "mlp"], default="omniglot",
               help="mlp: the quickstart's sine regressor (1-40-40-1, residual MLP warps), batch 10")
args = p.parse_args()
device = setup(args)
etas = [int(e) for e in args.etas.split(",")]
if args.model == "omniglot":
    model = warped_omniglot(device)
    data = synthetic_task(device, batch=args.batch)
    loss_fn = nn.functional.cross_entropy
else:
    args.batch = 10
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    model = warpopt.warp(net, layer=warpopt.MLPResidualWarp).to(device)
    xs = torch.rand(8, args.batch, 1, device=device) * 10 - 5
    data, loss_fn = (lambda k: (xs[k % 8], torch.sin(xs[k % 8]))), nn.functional.mse_loss
opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none())
with opt.task(data, loss_fn):
    for k in range(max(etas) - 1):
        x, y = data(k)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
samples = [opt.replay.sample(i, device) for i in range(len(opt.replay))]
context, params = opt.replay_context(), opt.meta_parameters()
vec = vectorised(chunk_size=args.chunk_size)
print(f"meta-step throughput ({args.model}): device {device} ({machine(device)}), batch {args.batch}, "
      f"chunk_size {args.chunk_size}, {args.repeats} repeats")
print(f"{'objective':>9} {'η':>3} {'loop samples/s':>15} {'vmap samples/s':>15} {'speed-up':>9}")
with opt.warp_trainable():
    for name, objective in (("exact", warpopt.exact), ("approx", warpopt.approx)):
        for eta in etas:
            batch = samples[:eta]
            times = interleaved({"loop": lambda o=objective, b=batch: meta_gradient(o, context, b, params),
                                 "vmap": lambda o=objective, b=batch: vec(o, context, b, params)},
                                args.repeats, device, progress=False)
            r = ratio(times, "loop", "vmap")
            target = "" if eta != 32 else ("  [meets ≥ 1.5]" if r >= 1.5 else "  [misses ≥ 1.5]")
            print(f"{name:>9} {eta:>3} {eta / median(times['loop']):>15.2f} {eta / median(times['vmap']):>15.2f} "
                  f"{r:>8.2f}x{target}", flush=True)

print(f"load average at the end: {load_average()} (1/5/15 min)")
