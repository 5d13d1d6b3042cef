"""End to end: one Omniglot meta-training step of warpopt against two replays written by hand.

One meta-step = T tasks × K task steps (SGD, lr 0.1) + one pass of replay over the T(K+1)
recorded points in mini-batches of η, one Adam warp update per mini-batch. Contenders:

- ``original (1st order)``: what the original WarpGrad implementation computes. After every
  task step the model's whole ``state_dict`` is copied to the CPU; replay loads each state back,
  takes the task gradient (built with ``create_graph=True``, as the original does) and then
  *detaches* it (the original passes it through ``.backward()`` into ``.grad``), steps, and
  differentiates the meta loss at the look-ahead point: the first-order (Eq. 8-like) gradient,
  whatever its option is called.
- ``2nd order (by hand)``: the same, keeping the task gradient in the graph: Eq. 7.
- ``warpopt approx`` / ``warpopt exact``: ``WarpGradMetaOptimizer`` with recording on the
  device and ``--gradient`` replay (vectorised on CUDA, the per-sample loop on CPU by default),
  ``objective=warpopt.approx`` (Eq. 8) / ``warpopt.exact`` (Eq. 7).

All visit the replay points in the same order; the script checks that warpopt approx lands on the
original's φ and warpopt exact on the second-order replay's φ, then times the four interleaved
and measures their peak memory. Printed: time and peak-memory ratios warpopt / hand-written.
Default: T = 2, K = 10, η = 11 (about 3 minutes on one CPU thread); ``--full``: the paper's
T = 20, K = 100, η = 32 (15-20 minutes per contender and meta-step on the 2-core CPU).

    python benchmarks/end_to_end.py
    python benchmarks/end_to_end.py --full --device cuda
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import warpopt  # noqa: E402
from warpopt.objectives import meta_gradient  # noqa: E402
from warpopt.vectorised import vectorised  # noqa: E402
from _common import (MiB, adapt_task, interleaved, load_average, machine, median, parser,  # noqa: E402
                     peak_memories, quotient, ratio, setup, synthetic_task, warped_omniglot)

p = parser(__doc__)
p.add_argument("--tasks", type=int, default=2)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--eta", type=int, default=11)
p.add_argument("--chunk-size", type=int, default=None)
p.add_argument("--gradient", choices=["auto", "vmap", "loop"], default="auto",
               help="warpopt's replay: vectorised (vmap) or the per-sample loop; auto: vmap on cuda, loop on cpu "
                    "(on CPU the conv learner's per-sample work is compute-bound: see meta_step_throughput.py)")
p.add_argument("--full", action="store_true", help="the paper's setting: 20 tasks × 100 steps, η = 32")
p.add_argument("--memory-repeats", type=int, default=2)
args = p.parse_args()
if args.full:
    args.tasks, args.steps, args.eta = 20, 100, 32
device = setup(args)
if args.gradient == "auto":
    args.gradient = "vmap" if device.type == "cuda" else "loop"
model = warped_omniglot(device)
loss_fn = nn.functional.cross_entropy
g = torch.Generator().manual_seed(args.seed)
tasks = [synthetic_task(device, generator=g) for _ in range(args.tasks)]
init_state = {k: v.clone() for k, v in model.state_dict().items()}
adapt_names = [n for n, _ in model.named_adapt_parameters()]
buffer_names = [n for n, _ in model.named_adapt_buffers()]
warp = list(model.warp_parameters())
warp_names = [n for n, _ in model.named_warp_parameters()]


def reset() -> None:
    model.load_state_dict(init_state)


def by_warpopt(objective) -> list[torch.Tensor]:
    reset()
    gradient = vectorised(chunk_size=args.chunk_size) if args.gradient == "vmap" else meta_gradient
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-3, objective=objective,
                                        initialisation=warpopt.none(),
                                        algorithm=warpopt.offline(batch_size=args.eta, gradient=gradient))
    for data in tasks:
        adapt_task(opt, model, data, loss_fn, args.steps)
    opt.meta_step()
    return [q.detach().clone() for q in warp]


def by_hand(first_order: bool) -> list[torch.Tensor]:
    """The original implementation's meta-step; ``first_order``: its detached task gradient."""
    reset()
    adapt = dict(model.named_adapt_parameters())
    for q in warp:
        q.requires_grad_(False)
    meta_opt = torch.optim.Adam(warp, lr=1e-3)
    snapshots = []  # (task index, step, CPU state_dict)
    for t, data in enumerate(tasks):
        model.load_state_dict(init_state)  # θ ← θ0 (warp parameters unchanged within a meta-step)
        sgd = torch.optim.SGD(list(adapt.values()), lr=0.1)
        snapshots.append((t, 0, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
        for k in range(args.steps):
            x, y = data(k)
            sgd.zero_grad()
            loss_fn(model(x), y).backward()
            sgd.step()
            snapshots.append((t, k + 1, {k2: v.detach().cpu().clone() for k2, v in model.state_dict().items()}))
    for q in warp:
        q.requires_grad_(True)
    order = torch.randperm(len(snapshots), generator=torch.Generator().manual_seed(0)).tolist()
    for start in range(0, len(order), args.eta):
        batch = order[start:start + args.eta]
        grads = [torch.zeros_like(q) for q in warp]
        for i in batch:
            t, k, state = snapshots[i]
            theta = [state[n].to(device).requires_grad_(True) for n in adapt_names]
            buffers = {n: state[n].to(device, copy=True) for n in buffer_names}
            x, y = tasks[t](k)
            task_loss = loss_fn(functional_call(model, {**dict(zip(adapt_names, theta)), **buffers}, (x,)), y)
            task_grads = torch.autograd.grad(task_loss, theta, create_graph=True)
            if first_order:
                task_grads = [gq.detach() for gq in task_grads]
            updated = [q - 0.1 * gq for q, gq in zip(theta, task_grads)]
            buffers = {n: state[n].to(device, copy=True) for n in buffer_names}
            meta_loss = loss_fn(functional_call(model, {**dict(zip(adapt_names, updated)), **buffers}, (x,)), y)
            for acc, part in zip(grads, torch.autograd.grad(meta_loss / len(batch), warp)):
                acc.add_(part)
        for q, gq in zip(warp, grads):
            q.grad = gq
        meta_opt.step()
        meta_opt.zero_grad()
    return [q.detach().clone() for q in warp]


contenders = {
    "original (1st order)": lambda: by_hand(first_order=True),
    "2nd order (by hand)": lambda: by_hand(first_order=False),
    "warpopt approx": lambda: by_warpopt(warpopt.approx),
    "warpopt exact": lambda: by_warpopt(warpopt.exact),
}
print(f"end to end: {args.tasks} tasks × {args.steps} steps + replay (η = {args.eta}, warpopt replay: "
      f"{args.gradient}), device {device} ({machine(device)}), {args.repeats} repeats", flush=True)
phi = {name: fn() for name, fn in contenders.items()}  # also the warm-up
start = [init_state[n] for n in warp_names]
moved = max((a - b).abs().max().item() for a, b in zip(phi["warpopt exact"], start))
for mine, theirs in (("warpopt approx", "original (1st order)"), ("warpopt exact", "2nd order (by hand)"),
                     ("warpopt exact", "original (1st order)")):
    diff = max((a - b).abs().max().item() for a, b in zip(phi[mine], phi[theirs]))
    print(f"max |φ({mine}) − φ({theirs})| = {diff:.2e}  (φ moved by up to {moved:.2e})", flush=True)
times = interleaved(contenders, args.repeats, device, warmup=0)
peaks = peak_memories(contenders, args.memory_repeats, device)
print(f"\n{'contender':>21} {'median s':>9} {'peak MiB':>9}")
for name in contenders:
    print(f"{name:>21} {median(times[name]):>9.2f} {peaks[name] / MiB:>9.1f}")
print("\nwarpopt / hand-written (time, peak memory); below 1: warpopt cheaper")
for mine in ("warpopt approx", "warpopt exact"):
    for theirs in ("original (1st order)", "2nd order (by hand)"):
        print(f"  {mine:>14} / {theirs:<21}: time {ratio(times, mine, theirs):.3f}x, "
              f"memory {quotient(peaks[mine], peaks[theirs]):.2f}x", flush=True)

print(f"load average at the end: {load_average()} (1/5/15 min)")
