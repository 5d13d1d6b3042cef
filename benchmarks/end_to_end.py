"""End to end: one Omniglot meta-training step, warpopt vs the same step computed the simple way.

One meta-step = T tasks × K task steps (SGD, lr 0.1) + one pass of exact-objective replay
(Eq. 7) over the T(K+1) recorded points in mini-batches of η, one Adam warp update per batch.

- warpopt: ``WarpGradMetaOptimizer`` with recording on the device and ``--gradient`` replay
  (vectorised on CUDA, the per-sample loop on CPU by default).
- simple: what the original implementation does: after every task step the model's whole
  ``state_dict`` is copied to the CPU; replay loads each state back and computes the sample's
  meta-gradient alone (create_graph task gradient, SGD look-ahead, meta loss, backward),
  accumulating η samples per update.

Both visit the replay points in the same order and update φ identically (the script checks
that the final warp parameters agree). Full setting: T = 20, K = 100 (paper); ``--quick``
uses T = 2, K = 10, η = 11. Target: warpopt ≥ 2× faster on CPU.
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
from _common import adapt_task, machine, median, parser, setup, synthetic_task, timed, warped_omniglot  # noqa: E402

p = parser(__doc__)
p.add_argument("--tasks", type=int, default=20)
p.add_argument("--steps", type=int, default=100)
p.add_argument("--eta", type=int, default=32)
p.add_argument("--chunk-size", type=int, default=None)
p.add_argument("--gradient", choices=["auto", "vmap", "loop"], default="auto",
               help="warpopt's replay: vectorised (vmap) or the per-sample loop; auto: vmap on cuda, loop on cpu "
                    "(on CPU the conv learner's per-sample work is compute-bound: see meta_step_throughput.py)")
p.add_argument("--quick", action="store_true", help="2 tasks × 10 steps, η = 11, 2 repeats")
args = p.parse_args()
if args.quick:
    args.tasks, args.steps, args.eta, args.repeats = 2, 10, 11, 2
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


def reset() -> None:
    model.load_state_dict(init_state)


def fast() -> list[torch.Tensor]:
    reset()
    opt = warpopt.WarpGradMetaOptimizer(
        model, lr=0.1, meta_lr=1e-3, initialisation=warpopt.none(),
        algorithm=warpopt.offline(batch_size=args.eta, gradient=vectorised(chunk_size=args.chunk_size)
                                  if args.gradient == "vmap" else meta_gradient))
    for data in tasks:
        adapt_task(opt, model, data, loss_fn, args.steps)
    opt.meta_step()
    return [q.detach().clone() for q in warp]


def simple() -> list[torch.Tensor]:
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


print(f"end to end: {args.tasks} tasks × {args.steps} steps + exact replay (η = {args.eta}, warpopt replay: "
      f"{args.gradient}), device {device} "
      f"({machine(device)}), {args.repeats} repeats", flush=True)
a, b = fast(), simple()  # warm-up, and the two must compute the same update
diff = max((x - y).abs().max().item() for x, y in zip(a, b))
moved = max((x - init_state_v).abs().max().item() for x, init_state_v in
            zip(a, [init_state[n] for n, _ in model.named_warp_parameters()]))
print(f"max |φ_warpopt − φ_simple| = {diff:.2e} (φ moved by up to {moved:.2e})", flush=True)
fast_t, simple_t, ratio = [], [], []
for _ in range(args.repeats):
    s = timed(simple, device)
    f = timed(fast, device)
    simple_t.append(s)
    fast_t.append(f)
    ratio.append(s / f)
    print(f"  simple {s:.2f} s, warpopt {f:.2f} s, speed-up {s / f:.2f}x", flush=True)
r = median(ratio)
print(f"median: simple {median(simple_t):.2f} s, warpopt {median(fast_t):.2f} s, speed-up {r:.2f}x "
      f"[{'meets' if r >= 2 else 'misses'} ≥ 2×]")
