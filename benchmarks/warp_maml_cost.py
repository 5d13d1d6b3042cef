"""Warp-MAML against MAML: cost of a meta-step, and accuracy at equal training time.

The Omniglot 5-way 1-shot quick setting of ``examples/fewshot.py --quick``: its conv net (4 blocks
of 32 filters, BatchNorm on batch statistics), Warp-MAML's partition (a linear 3×3 ``ConvWarp``
after the conv of blocks 2-4, block 1 meta-learned), 5 SGD task steps at lr 0.4 on the support
set, 15 query images per class, meta-batch 1.

1. Cost (random 28×28 episodes, float32, interleaved, medians of per-repeat ratios):
   ``warp-maml``         warpopt: ``online()``, ``exact``, ``maml()``, the user's task loop
   ``maml (torch)``      second-order MAML on the plain net, hand-written (the example's baseline)
   ``maml (warpopt)``    ``maml()`` through warpopt, no warp learning
   ``warp-maml by hand`` Warp-MAML with each term computed separately (``_maml.TorchWarpMAML``)
   A float64 check first: warpopt's Warp-MAML meta-gradient (φ and θ0) equals the hand-written
   one. Target (issue 18): warp-maml ≤ 2.5× a MAML step.
2. Equal time (``--budget`` seconds of meta-training each, 0 to skip): runs
   ``examples/fewshot.py --quick --ways 5`` for MAML and Warp-MAML with meta-step counts set
   from the costs measured in 1, then reads each run's test accuracy (600 episodes) and
   measured training time from its results.json.

    python benchmarks/warp_maml_cost.py                 # cost + 60 s equal-time runs: about 5 minutes
    python benchmarks/warp_maml_cost.py --budget 0      # cost only, about 1 minute
    python benchmarks/warp_maml_cost.py --device cuda
"""
import functools
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import torch  # noqa: E402

from _common import load_average, interleaved, machine, median, parser, ratio, setup  # noqa: E402
from _maml import (Setting, TorchMAML, TorchWarpMAML, WarpMAML, WarpoptMAML, episodes,  # noqa: E402
                   meta_gradient_gap)
from fewshot_models import ConvNet, warp_convnet  # noqa: E402

p = parser(__doc__)
p.add_argument("--budget", type=float, default=60.0, help="seconds of meta-training per method (0: skip)")
p.add_argument("--data-root", default=None, help="Omniglot folder for the equal-time runs (the example's default)")
p.add_argument("--out", default=os.path.join(ROOT, "runs", "warp_maml_cost"))
p.set_defaults(repeats=15)
args = p.parse_args()
device = setup(args)
s = Setting(meta_batch=1)


def net(dtype=torch.float32) -> torch.nn.Module:
    return ConvNet(1, [s.filters] * 4, s.ways, 28).to(device=device, dtype=dtype)


warp = functools.partial(warp_convnet, after="conv")
print(f"Warp-MAML vs MAML: {s.ways}-way {s.shots}-shot, {s.filters} filters, {s.steps} steps, {s.queries} queries "
      f"per class, meta-batch {s.meta_batch}; device {device} ({machine(device)}); {args.repeats} repeats", flush=True)
check = Setting(meta_batch=2)
gaps = meta_gradient_gap({"by hand": functools.partial(TorchWarpMAML, warp=warp)}, check, seed=args.seed,
                         reference=functools.partial(WarpMAML, warp=warp), net=ConvNet(1, [s.filters] * 4, s.ways, 28))
print(f"float64 check (meta-batch 2): max |Δ(φ, θ0)| warpopt vs by hand = {gaps['by hand']:.1e} "
      f"[{'same' if gaps['by hand'] <= 1e-10 else 'DIFFERENT'}] (meta-gradient up to "
      f"{gaps['(|meta-gradient|, max)']:.3g})", flush=True)

base = net()
tasks = episodes(s, device=device, generator=torch.Generator().manual_seed(args.seed))
contenders = {"warp-maml": WarpMAML(base, s, warp=warp), "maml (torch)": TorchMAML(base, s),
              "maml (warpopt)": WarpoptMAML(base, s), "warp-maml by hand": TorchWarpMAML(base, s, warp=warp)}
times = interleaved({n: (lambda c=c: c.meta_step(tasks)) for n, c in contenders.items()}, args.repeats, device)
print()
for name in contenders:
    print(f"{name:>18}: median {1e3 * median(times[name]):.1f} ms per meta-step")
cost = ratio(times, "warp-maml", "maml (torch)")
print(f"warp-maml / maml (torch):      {cost:.2f}x  [{'meets' if cost <= 2.5 else 'misses'} ≤ 2.5]")
print(f"warp-maml / maml (warpopt):    {ratio(times, 'warp-maml', 'maml (warpopt)'):.2f}x")
print(f"warp-maml / warp-maml by hand: {ratio(times, 'warp-maml', 'warp-maml by hand'):.2f}x", flush=True)

if args.budget > 0:
    print(f"\nequal time: {args.budget:.0f} s of meta-training each (examples/fewshot.py --quick --ways 5, "
          f"seed {args.seed}, 600 test episodes)", flush=True)
    runs = {"maml": median(times["maml (torch)"]), "warp-maml": median(times["warp-maml"])}
    for kind, per_step in runs.items():
        steps = max(1, round(args.budget / per_step))
        out = os.path.join(args.out, f"{kind}-seed{args.seed}")
        cmd = [sys.executable, os.path.join(ROOT, "examples", "fewshot.py"), "--dataset", "omniglot", "--quick",
               "--ways", "5", "--meta-learner", kind, "--meta-steps", str(steps), "--seed", str(args.seed),
               "--device", args.device, "--threads", str(args.threads), "--out", out, "--no-progress"]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "results.json")) as f:
            r = json.load(f)["results"][0]
        print(f"{kind:>10}: {steps} meta-steps in {r['train_seconds']:.0f} s -> test accuracy "
              f"{r['accuracy']:.1f} ± {r['ci95']:.1f} % ({r['test_episodes']} episodes)", flush=True)

print(f"load average at the end: {load_average()} (1/5/15 min)")
