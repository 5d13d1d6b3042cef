"""Second-order MAML meta-step: warpopt ``maml()`` against the peer libraries, side by side.

MAML's Omniglot 5-way 1-shot setting on random 28×28 images: 4 × (conv 3×3, 32 filters, BatchNorm
on batch statistics, ReLU, max-pool 2) + linear head, 5 SGD task steps at lr 0.4 on the support
set, query loss on 15 images per class, meta-batch 4, one Adam step on θ0; float32.
Contenders (see ``_maml.py``): warpopt (the user's two-line task loop under
``WarpGradMetaOptimizer(..., initialisation=warpopt.maml())``), a hand-written functional
``torch`` MAML (and ``torch-add``, the same with warpopt's one-op SGD update: warpopt's kernels
without bookkeeping), and each installed peer of ``higher``, ``torchopt`` (``MetaSGD``) and
``learn2learn`` (``MAML``). All run interleaved in one process; the script prints median times,
median peak memory, and the medians of the per-repeat ratios warpopt / contender. First it
checks in float64 that every contender's meta-gradient equals warpopt's (to 1e-10).
Target (issue 18): warpopt ≤ 0.95× the fastest peer.

    python benchmarks/maml_peers.py                 # 15 repeats: 1.5 min on the loaded 2-core VM
    python benchmarks/maml_peers.py --device cuda
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

from _common import (MiB, interleaved, load_average, machine, median, parser, peak_memories, quotient,  # noqa: E402
                     ratio, setup)
from _maml import HAND_WRITTEN, PEERS, Setting, WarpoptMAML, available, episodes, fewshot_net, meta_gradient_gap  # noqa: E402

p = parser(__doc__)
p.add_argument("--meta-batch", type=int, default=4)
p.add_argument("--steps", type=int, default=5, help="task steps")
p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ", ".join(PEERS))
p.add_argument("--memory-repeats", type=int, default=3)
p.set_defaults(repeats=15)
args = p.parse_args()
device = setup(args)
s = Setting(meta_batch=args.meta_batch, steps=args.steps)
peers, missing = available(args.peers.split(","))
print(f"MAML meta-step, second order: {s.ways}-way {s.shots}-shot, {s.filters} filters, {s.steps} steps, "
      f"meta-batch {s.meta_batch}; device {device} ({machine(device)}); {args.repeats} repeats")
for name, why in missing.items():
    print(f"  {name}: not installed or broken here, skipped ({why})")

gaps = meta_gradient_gap({n: PEERS[n] for n in peers}, s, seed=args.seed)
scale = gaps.pop("(|meta-gradient|, max)")
print(f"float64 meta-gradient check (max |g| = {scale:.3g}): " +
      ", ".join(f"{n} {g:.1e} [{'same' if g <= 1e-10 else 'DIFFERENT'}]" for n, g in gaps.items()), flush=True)

net = fewshot_net(s, device=device)
tasks = episodes(s, device=device, generator=torch.Generator().manual_seed(args.seed))
contenders = {"warpopt": WarpoptMAML(net, s)}
contenders.update({name: PEERS[name](net, s) for name in peers})
print(f"warpopt's model: {contenders['warpopt'].how}")
steps = {name: (lambda c=c: c.meta_step(tasks)) for name, c in contenders.items()}
times = interleaved(steps, args.repeats, device)
peaks = peak_memories(steps, args.memory_repeats, device)

print(f"\n{'contender':>12} {'median s':>9} {'peak MiB':>9} {'warpopt / it (time)':>20} {'(memory)':>9}")
for name in contenders:
    r = ratio(times, "warpopt", name)
    m = quotient(peaks["warpopt"], peaks[name])
    print(f"{name:>12} {median(times[name]):>9.3f} {peaks[name] / MiB:>9.1f} {r:>19.3f}x {m:>8.2f}x", flush=True)
fastest = min((n for n in contenders if n != "warpopt" and n not in HAND_WRITTEN), key=lambda n: median(times[n]),
              default=None)
if fastest is not None:
    r = ratio(times, "warpopt", fastest)
    print(f"warpopt / fastest peer ({fastest}): {r:.3f}x  [{'meets' if r <= 0.95 else 'misses'} ≤ 0.95]")

print(f"load average at the end: {load_average()} (1/5/15 min)")
