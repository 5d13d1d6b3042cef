"""The memory passes a recorded step adds, one piece at a time (issue 18, items 2 and 3).

Each piece of per-step work that recording and Leap add to a task step, timed in isolation on
the 1.86M-parameter MLP's shapes (784-1024-1024-10, 7.5 MB of float32), with the data out of
cache as in a task loop (a 64 MB buffer is written between calls; a recorded point goes to a
different row each step, as in the recording arena). A pass is one read or one write of |θ|
values. Then the pieces each variant runs per step, before and after issue 18's changes:

  record               the point's copy (1 read + 1 write); before: + the finite check of the
                       gradients (1 read), now a check of θ_K once per task
  Leap (train)         close the open segment: grad −= inv·Δθ (3), grad −= (ΔL·inv)·∇L(θ_{k-1}) (3);
                       open the next: Δθ = θ_{k+1} − θ_k (3), |Δθ|² (1); keep ∇L(θ_k): a copy (2)
                       where the loop zeroes gradients in place, none where zero_grad() sets them to
                       None (the loop's tensors are held); before: + copy θ_{k+1} into Leap's own θ_k
                       (2), now read off the recording, and ∇L(θ_k) always copied
  Leap (noL / probe)   Δθ (3), |Δθ|² (1), grad −= inv·Δθ (3) (probe: + (ΔL·inv)·∇L (3));
                       before: + the copy of θ_{k+1} (2)

    python benchmarks/recording_passes.py      # 10 s
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import torch
from _common import load_average, machine, median, mlp, parser, setup, sync

p = parser(__doc__)
p.add_argument("--rows", type=int, default=50, help="recorded rows the point copy cycles through")
args = p.parse_args()
device = setup(args)
params = [q.detach().to(device) for q in mlp().parameters()]
n = sum(q.numel() for q in params)


def like(fill=None):
    return [torch.randn_like(q) if fill is None else torch.full_like(q, fill) for q in params]


grads, acc, delta, last, last_grad = like(), like(0.0), like(), like(), like()
rows = [torch.zeros(n, device=device) for _ in range(args.rows)]
flat = torch.cat([q.reshape(-1) for q in params])  # θ_k as a recorded point holds it
theta_k = [v.view_as(q) for v, q in zip(flat.split([q.numel() for q in params]), params)]
scale = torch.tensor(0.5, device=device)
evict = torch.empty(16 * 2**20, device=device)
row = [0]


def record() -> None:
    row[0] = (row[0] + 1) % len(rows)
    torch.cat([q.reshape(-1) for q in params], out=rows[row[0]])


PIECES = {  # name: (passes, the work)
    "record: copy θ_{k+1} into a row": (2, record),
    "finite check of the gradients": (1, lambda: torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())),
    "Δθ = θ_{k+1} − θ_k (sub, out=)": (3, lambda: [torch.sub(a, b, out=d) for d, a, b in zip(delta, params, theta_k)]),
    "|Δθ|² (foreach_norm)": (1, lambda: torch.stack(torch._foreach_norm(delta)).pow(2).sum()),
    "grad −= c·v (addcmul_)": (3, lambda: [a.addcmul_(d, scale, value=-1) for a, d in zip(acc, delta)]),
    "copy θ_{k+1} or ∇L (foreach_copy_)": (2, lambda: torch._foreach_copy_(last, params)),
    "SGD step, for scale (add_)": (3, lambda: [q.add_(g, alpha=-0.0) for q, g in zip(params, grads)]),
}


def cold(fn) -> float:
    times = []
    for r in range(max(args.repeats, 5) * 4):
        evict.fill_(r)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return median(times)


print(f"passes over |θ| = {n:,} (float32, {4 * n / 1e6:.1f} MB) per recorded step; {machine(device)}", flush=True)
cost = {}
for name, (passes, fn) in PIECES.items():
    fn()
    cost[name] = cold(fn)
    print(f"  {name:38s} {passes} passes  {1e6 * cost[name]:7.0f} µs  ({1e6 * cost[name] / passes:5.0f} µs/pass)")
per_pass = median([cost[k] / v[0] for k, v in PIECES.items()])
print(f"median {1e6 * per_pass:.0f} µs per pass")
VARIANTS = {  # passes per step: before issue 18's changes, after
    "record": (3, 2),
    "record + leap(), zero_grad() (set to None)": (3 + 14, 2 + 10),
    "record + leap(), gradients zeroed in place": (3 + 14, 2 + 12),
    "record + leap(loss_term=False)": (3 + 9, 2 + 7),
    "record + leap(loss='probe') (+ a forward)": (3 + 12, 2 + 10),
}
for name, (before, after) in VARIANTS.items():
    ms = f"{1e3 * before * per_pass:.2f} → {1e3 * after * per_pass:.2f} ms"
    print(f"  {name:44s} {before:2d} → {after:2d} passes ≈ {ms}")
print(f"load average at the end: {load_average()} (1/5/15 min)")
