"""Memory: the replay buffer and a meta-step against the analytic minimum.

The buffer of one task adapted for K steps holds K + 1 points (θ_0 … θ_K); the analytic
minimum is (K + 1) × |θ| × bytes per element (plain SGD keeps no optimizer state). Target:
``ReplayBuffer.nbytes()`` ≤ 1.2× the minimum, in float32 and float16 storage. A meta-step's
peak memory (η samples, exact objective, loop vs vectorised with a few chunk sizes) is reported
above the memory in use before it: ``torch.cuda.max_memory_allocated`` on CUDA, the process's
peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) on CPU (``_common.peak_memory``).

    python benchmarks/memory.py            # K = 100, η = 16: about 1 minute on one CPU thread
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import warpopt  # noqa: E402
from warpopt.objectives import meta_gradient  # noqa: E402
from warpopt.vectorised import vectorised  # noqa: E402
from _common import (MiB, adapt_task, count, load_average, machine, parser, peak_memories, setup,  # noqa: E402
                     synthetic_task, warped_omniglot)

p = parser(__doc__)
p.add_argument("--steps", type=int, default=100, help="K")
p.add_argument("--eta", type=int, default=16)
p.set_defaults(repeats=3)
args = p.parse_args()
device = setup(args)
model = warped_omniglot(device)
data = synthetic_task(device)
loss_fn = nn.functional.cross_entropy
theta = count(model.adapt_parameters())


def fill(dtype=None) -> warpopt.WarpGradMetaOptimizer:
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none(),
                                        replay=warpopt.ReplayBuffer(dtype=dtype))
    adapt_task(opt, model, data, loss_fn, args.steps)
    return opt


print(f"memory: device {device} ({machine(device)}), K = {args.steps}, |θ| = {theta}, η = {args.eta}")
for dtype, size in ((None, 4), (torch.float16, 2)):
    opt = fill(dtype)
    points = len(opt.replay)
    minimum = points * theta * size
    ratio = opt.replay.nbytes() / minimum
    print(f"buffer {str(dtype or torch.float32):>13}: {points} points, {opt.replay.nbytes() / MiB:.2f} MiB vs minimum "
          f"{minimum / MiB:.2f} MiB = {ratio:.3f}x  [{'meets' if ratio <= 1.2 else 'misses'} ≤ 1.2]")
    if dtype is None:
        kept = opt
    else:
        opt.replay.clear()

samples = [kept.replay.sample(i, device) for i in range(min(args.eta, len(kept.replay)))]
context, params = kept.replay_context(), kept.meta_parameters()
per_sample_minimum = theta * 4
variants = [("loop", meta_gradient)] + [(f"vmap chunk {c}", vectorised(chunk_size=c)) for c in (1, 4, None)]
with kept.warp_trainable():
    runs = {name: (lambda fn=fn: fn(warpopt.exact, context, samples, params)) for name, fn in variants}
    for run in runs.values():
        run()  # warm-up (allocator caches, lazy init)
    peaks = peak_memories(runs, args.repeats, device)
for name, peak in peaks.items():
    print(f"meta-step exact η={len(samples)} {name:>14}: peak +{peak / MiB:.1f} MiB "
          f"({peak / per_sample_minimum:.1f}× |θ|·4 bytes), median of {args.repeats}")

print(f"load average at the end: {load_average()} (1/5/15 min)")
