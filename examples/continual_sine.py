"""Continual sine regression: meta-learning a warp that mitigates forgetting (Appendix J, Fig. 10).

[−5, 5] is split into 5 sub-intervals (sub-tasks) presented one after the other; the task
learner (4 Linear layers, 200 hidden units, ReLU; a residual 2-layer tanh warp block of 100
units after every ReLU) takes 20 SGD steps (α = 0.001, batch 5) on each, K = 100 steps in all,
always from the same fixed random θ0 (not meta-learned). A task sequence is the target
f(x) = σ(x + o) a1 sin(x − b1) + (1 − σ(x + o)) a2 sin(x − b2), a ~ U[0.1, 5], b ~ U[0, π],
o ~ U[−5, 5]. The meta-objective (Eq. 19) scores a point θ_k of sub-task t (t = k // 20) by
the validation losses of sub-tasks 1..t — current and all earlier ones — so the warp is
rewarded for updates that learn the current sub-task without undoing the earlier ones.

Meta-training uses the offline algorithm (Algorithm 2) with the exact objective (Eq. 7):
every meta-batch of 5 sequences yields 505 replayable points, and replaying them in
mini-batches gives tens of warp updates per meta-batch instead of the single update of the
online algorithm (Algorithm 1) for the same replay cost; that is what lets the effect show
within a CPU budget. The exact objective is needed: the approximate one (Eq. 8) stops the
gradient through the task update, so it cannot see how an update on sub-task t changes the
losses of sub-tasks < t, which is the whole point here.

Outputs (``--out``): config.json, results.json (per-sub-task loss curves over the 100 steps
for the meta-training order and the random order [1, 3, 4, 2, 0]; final loss on the earlier
sub-tasks, WarpGrad vs plain SGD from the same θ0), curves.png (Fig. 10 style), meta_loss.png,
fig11.png (Fig. 11: one held-out sequence's ground truth and predictions before adaptation and
after each sub-task, in the meta-training order and in the random order).

    python examples/continual_sine.py --quick          # 100 meta-batches, 20 warp updates each, meta-lr 3e-3
    python examples/continual_sine.py --device cuda    # the paper's length (20 000 meta-batches)
"""
from __future__ import annotations

import copy
import functools
import os

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import harness
import warpopt

T = 5  # sub-tasks
RANDOM_ORDER = [1, 3, 4, 2, 0]  # Fig. 10 (b)


# ----------------------------------------------------------------------------- task family
def sample_sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    """n task sequences as rows (a1, b1, a2, b2, o)."""
    u = torch.rand(n, 5, generator=generator)
    lo = torch.tensor([0.1, 0.0, 0.1, 0.0, -5.0])
    hi = torch.tensor([5.0, torch.pi, 5.0, torch.pi, 5.0])
    return lo + u * (hi - lo)


def target(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f_τ(x), Eq. 17; ``p[..., 5]`` broadcasts against ``x[..., m]`` along the leading dims."""
    a1, b1, a2, b2, o = (p[..., i:i + 1] for i in range(5))
    mix = torch.sigmoid(x + o)
    return mix * a1 * torch.sin(x - b1) + (1 - mix) * a2 * torch.sin(x - b2)


def sample_x(sub: int, shape, generator: torch.Generator) -> torch.Tensor:
    """Inputs of sub-task ``sub``: uniform on [−5 + 2 sub, −3 + 2 sub]."""
    return -5.0 + 2.0 * sub + 2.0 * torch.rand(shape, generator=generator)


def task_loss(forward, batch):
    """Eq. 18: 1/(2|D|) Σ (h(x) − f(x))²."""
    x, y = batch
    return 0.5 * (forward(x) - y).pow(2).mean()


def weighted_loss(forward, batch):
    """Eq. 19 as a weighted sum over the validation points of sub-tasks 1..t."""
    x, y, w = batch
    return (w * 0.5 * (forward(x) - y).pow(2).squeeze(-1)).sum()


def make_task(p: torch.Tensor, order, args, generator, device) -> warpopt.Task:
    """One sequence: L_task on the current sub-task's batch at step k; L_meta (Eq. 19) on
    fresh validation batches of the sub-tasks seen so far, keyed on the replayed step k."""
    n = args.steps_per_task

    def train_batch(k):
        x = sample_x(order[min(k // n, T - 1)], (args.batch, 1), generator)
        return x.to(device), target(p, x).to(device)

    def meta_batch(k):
        t = min(k // n, T - 1)
        xs = torch.cat([sample_x(order[i], (args.val_batch, 1), generator) for i in range(t + 1)])
        if args.meta_weighting == "mean":  # (1/t) Σ_{i≤t} L_i  (Appendix C, Eq. 15)
            w = torch.full((t + 1,), 1.0 / (t + 1))
        else:  # Eq. 19's normalisation by appearances: sub-task i counts n(T − i + 1) times
            w = torch.tensor([1.0 / (n * (T - i)) for i in range(t + 1)])
        w = w.repeat_interleave(args.val_batch) / args.val_batch
        return xs.to(device), target(p, xs).to(device), w.to(device)

    return warpopt.Task(train_batch, batch_loss=task_loss, meta_data=meta_batch, meta_loss=weighted_loss)


# ----------------------------------------------------------------------------- model
def build_net(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


# ----------------------------------------------------------------------------- evaluation
def run_sequences(model, theta0: dict, seqs, order, lr, args, generator, device):
    """SGD through ``model`` (its warp fixed) from θ0 on every sequence at once (vmapped).

    Returns the validation loss of every sub-task at steps 0, e, 2e, ..., K (e = eval_every):
    [S, K / e + 1, T], sub-tasks
    indexed by their interval (0 = [−5, −3]), not by presentation order.
    """
    n, S = args.steps_per_task, len(seqs)
    params = {k: v.detach().to(device).unsqueeze(0).expand(S, *v.shape).clone() for k, v in theta0.items()}
    val_x = torch.stack([sample_x(i, (S, args.eval_val), generator) for i in range(T)], 1)  # [S, T, V]
    val_y = target(seqs[:, None, :], val_x)
    val_x, val_y, seqs_d = val_x.to(device), val_y.to(device), seqs.to(device)

    def loss(prm, x, y):
        out = functional_call(model, prm, (x.unsqueeze(-1),), strict=False).squeeze(-1)
        return 0.5 * (out - y).pow(2).mean()

    step_grad = vmap(grad(loss))
    val = vmap(vmap(loss, in_dims=(None, 0, 0)))
    curve = []
    with torch.no_grad():
        curve.append(val(params, val_x, val_y))
    for k in range(T * n):
        x = sample_x(order[k // n], (S, args.batch), generator).to(device)
        g = step_grad(params, x, target(seqs_d[:, None, :], x))
        with torch.no_grad():
            params = {name: params[name] - lr * g[name] for name in params}
            if (k + 1) % args.eval_every == 0:
                curve.append(val(params, val_x, val_y))
    return torch.stack(curve, 1).cpu()


def summarise(curves: torch.Tensor, order, every: int) -> dict:
    """Means over sequences; 'earlier' = the sub-tasks presented before the last one."""
    mean = curves.mean(0)  # [K + 1, T]
    final = curves[:, -1]
    earlier = final[:, order[:-1]].mean(1)
    return {"final_loss_earlier_subtasks": earlier.mean().item(),
            "final_loss_earlier_subtasks_sem": (earlier.std() / len(earlier) ** 0.5).item(),
            "final_loss_last_subtask": final[:, order[-1]].mean().item(),
            "final_loss_all_subtasks": final.mean().item(),
            "initial_loss_all_subtasks": curves[:, 0].mean().item(),
            "mean_curve_by_subtask": {str(i): mean[:, i].tolist() for i in range(T)},
            "mean_curve_steps": list(range(0, curves.shape[1] * every, every))}


def plot(curves: dict, args, history):
    plt = harness.pyplot()

    names = list(curves)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), sharey=True, squeeze=False)
    for row, (order_name, order) in enumerate((("meta-training order", list(range(T))),
                                               ("random order", RANDOM_ORDER))):
        for col, name in enumerate(names):
            ax = axes[row, col]
            c = curves[name][order_name].mean(0)
            steps = torch.arange(len(c)) * args.eval_every
            for pos, sub in enumerate(order):
                ax.plot(steps, c[:, sub], label=f"sub-task {sub} (#{pos + 1})", color=f"C{sub}")
                ax.axvspan(pos * args.steps_per_task, (pos + 1) * args.steps_per_task, color=f"C{sub}",
                           alpha=0.06)
            ax.set_yscale("log")
            ax.set_title(f"{name}\n{order_name} {order}", fontsize=9)
            ax.set_xlabel("task step k")
    axes[0, 0].set_ylabel("validation loss (mean over sequences)")
    axes[1, 0].set_ylabel("validation loss (mean over sequences)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    harness.plot_smoothed(ax, history, label="meta-loss")
    ax.set(xlabel="meta-step (meta-batch of sequences)", ylabel="mean meta-loss (Eq. 19) over the replay", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "meta_loss.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
QUICK = {"meta_steps": 100, "meta_lr": 3e-3, "max_updates": 20, "eval_sequences": 50, "eval_val": 20, "eval_every": 5}
NOTES = {"lr": "paper (0.001)", "steps_per_task": "paper (20)", "batch": "paper (5)", "hidden": "paper (200)",
         "warp_hidden": "paper (100)", "meta_lr": "paper (Adam 1e-3)", "meta_batch": "paper (5)",
         "meta_steps": "paper (20 000)", "eval_sequences": "paper (100)",
         "replay_batch": "ours (paper: online or offline unstated)", "max_updates": "ours", "val_batch": "ours",
         "meta_weighting": "ours (the paper's Eq. 19 normalisation is ambiguous; 'mean' = Eq. 15)",
         "eval_val": "ours", "eval_every": "ours", "sgd_lrs": "ours"}


def parser():
    p = harness.ExampleParser("continual_sine", __doc__, quick=QUICK,
                              quick_help="100 meta-batches, 20 warp updates each, meta-lr 3e-3")
    p.add_argument("--meta-steps", type=int, default=20000, help="meta-batches")
    p.add_argument("--meta-batch", type=int, default=5, help="task sequences per meta-batch")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate β of the warps")
    p.add_argument("--lr", type=float, default=1e-3, help="α, the task learning rate")
    p.add_argument("--steps-per-task", type=int, default=20, help="SGD steps per sub-task")
    p.add_argument("--batch", type=int, default=5, help="task batch size")
    p.add_argument("--val-batch", type=int, default=5, help="validation points per sub-task in L_meta")
    p.add_argument("--hidden", type=int, default=200, help="hidden units of the task learner")
    p.add_argument("--warp-hidden", type=int, default=100, help="hidden units of each warp block")
    p.add_argument("--replay-batch", type=int, default=5, help="η, points per warp update (offline)")
    p.add_argument("--max-updates", type=int, default=None, help="warp updates per meta-step (None: a full pass)")
    p.add_argument("--meta-weighting", choices=["mean", "appearance"], default="mean",
                   help="Eq. 15's 1/t mean, or Eq. 19's 1/(n(T-i+1)) by appearances")
    p.add_argument("--eval-sequences", type=int, default=100, help="held-out task sequences")
    p.add_argument("--eval-val", type=int, default=50, help="validation points per sub-task in evaluation")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every e task steps")
    p.add_argument("--sgd-lrs", type=float, nargs="*", default=[0.003, 0.01],
                   help="extra plain-SGD baselines at larger α (they learn, and forget)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.steps_per_task % args.eval_every:
        p.error("--eval-every must divide --steps-per-task")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = harness.start(args)
    gen = torch.Generator().manual_seed(args.seed)
    net = build_net(args.hidden).to(device)  # θ0: this fixed random initialisation
    baseline = copy.deepcopy(net)  # plain SGD: no warp at all, same θ0
    model = warpopt.warp(net, layer=functools.partial(warpopt.MLPResidualWarp, hidden=args.warp_hidden))
    theta0 = {k: v.detach().clone() for k, v in model.named_adapt_parameters()}
    opt = warpopt.WarpGradMetaOptimizer(
        model, lr=args.lr, meta_lr=args.meta_lr, objective=warpopt.exact, initialisation=warpopt.none(),
        algorithm=warpopt.offline(batch_size=args.replay_batch, max_updates=args.max_updates,
                                  gradient=warpopt.vectorised.vectorised()))  # η samples per vmap call
    harness.write_config(args, NOTES, task_optimizer="SGD", meta_optimizer="Adam", objective="exact (Eq. 7)",
                         algorithm="offline (Algorithm 2)", initialisation="none (fixed random θ0)",
                         warp_layers=[n for n in model.warp_layers()],
                         architecture="4 Linear layers (3 hidden ReLU layers) as the paper's '4-layer' net (ours)")

    history, watch = [], harness.Stopwatch()
    for _ in harness.bar(range(args.meta_steps), desc="continual_sine", unit="meta-step"):
        with watch:
            for p in sample_sequences(args.meta_batch, gen):
                task = make_task(p, list(range(T)), args, gen, device)
                with opt.task(task):
                    for k in range(T * args.steps_per_task):
                        opt.zero_grad()
                        task_loss(model, task.task_batch(k)).backward()
                        opt.step()
            history.append(opt.meta_step()["meta_loss"])
    train_time, train_cpu = watch.wall, watch.cpu

    eval_gen = torch.Generator().manual_seed(args.seed + 10_000)
    seqs = sample_sequences(args.eval_sequences, eval_gen)
    base_theta = {k: v.detach().clone() for k, v in baseline.named_parameters()}
    learners = {"WarpGrad": (model, theta0, args.lr), f"SGD α={args.lr:g}": (baseline, base_theta, args.lr)}
    for lr in args.sgd_lrs:
        learners[f"SGD α={lr:g}"] = (baseline, base_theta, lr)
    curves, results = {}, {}
    for name, (m, th, lr) in learners.items():
        curves[name], results[name] = {}, {}
        for order_name, order in (("meta-training order", list(range(T))), ("random order", RANDOM_ORDER)):
            g = torch.Generator().manual_seed(args.seed + 20_000)  # same batches for every learner
            c = run_sequences(m, th, seqs, order, lr, args, g, device)
            curves[name][order_name] = c
            results[name][order_name] = summarise(c, order, args.eval_every)
    sgd = f"SGD α={args.lr:g}"
    headline = {o: {"warpgrad_final_loss_earlier": results["WarpGrad"][o]["final_loss_earlier_subtasks"],
                    "sgd_final_loss_earlier": results[sgd][o]["final_loss_earlier_subtasks"]}
                for o in ("meta-training order", "random order")}
    out = {"headline": headline, "eval_sequences": args.eval_sequences, "meta_train_seconds": train_time,
           "meta_train_cpu_seconds": train_cpu,
           "meta_loss_history": history, "learners": results}
    fig11 = {o: {name: subtask_predictions(m, th, seqs[0], order, lr, args,
                                           torch.Generator().manual_seed(args.seed + 30_000), device).tolist()
                 for name, (m, th, lr) in list(learners.items())[:2]}
             for o, order in (("meta-training order", list(range(T))), ("random order", RANDOM_ORDER))}
    out["fig11"] = {"sequence": seqs[0].tolist(), "x": FIG11_X.tolist(), "predictions": fig11}
    harness.write_json(args.out, "results.json", out)
    if not args.no_plots:
        plot(curves, args, history)
        plot_fig11(out["fig11"], args)
    for o, h in headline.items():
        print(f"{o}: final loss on earlier sub-tasks WarpGrad {h['warpgrad_final_loss_earlier']:.3f} vs "
              f"plain SGD {h['sgd_final_loss_earlier']:.3f}")
    for name in learners:
        r = results[name]["meta-training order"]
        print(f"  {name}: earlier {r['final_loss_earlier_subtasks']:.3f}, last {r['final_loss_last_subtask']:.3f}, "
              f"initial {r['initial_loss_all_subtasks']:.3f}")
    print(f"meta-training {train_time:.0f} s; outputs in {args.out}")
    if args.quick:
        print("the paper's length (20 000 meta-batches of 5 sequences; GPU): python examples/continual_sine.py "
              f"--device cuda --meta-steps 20000 --seed {args.seed}")
    return out


# ----------------------------------------------------------------------------- Fig. 11
FIG11_X = torch.linspace(-5, 5, 200)


def subtask_predictions(model, theta0: dict, p: torch.Tensor, order, lr, args, generator, device) -> torch.Tensor:
    """Predictions on ``FIG11_X`` for one sequence ``p``: before adaptation and after each sub-task
    (the same SGD steps as ``run_sequences``, for one sequence): ``[T + 1, len(FIG11_X)]``."""
    n = args.steps_per_task
    params = {k: v.detach().to(device).clone() for k, v in theta0.items()}
    xs = FIG11_X[:, None].to(device)

    def loss(prm, x, y):
        return 0.5 * (functional_call(model, prm, (x,), strict=False) - y).pow(2).mean()

    def predict(prm):
        with torch.no_grad():
            return functional_call(model, prm, (xs,), strict=False)[:, 0].cpu()

    step_grad, preds = grad(loss), [predict(params)]
    for k in range(T * n):
        x = sample_x(order[k // n], (args.batch, 1), generator)
        g = step_grad(params, x.to(device), target(p, x).to(device))
        params = {name: params[name] - lr * g[name] for name in params}
        if (k + 1) % n == 0:
            preds.append(predict(params))
    return torch.stack(preds)


def plot_fig11(fig11: dict, args) -> None:
    """Fig. 11: rows = sub-tasks in presentation order; ground truth (black), before adaptation
    (dashed green), after training on the sub-tasks up to this one (red; plain SGD dotted grey)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.tensor(fig11["x"])
    truth = target(torch.tensor(fig11["sequence"]), x)
    orders = {"meta-training order": list(range(T)), "random order": RANDOM_ORDER}
    fig, axes = plt.subplots(T, 2, figsize=(9, 2.0 * T), sharex=True, sharey=True)
    for col, (name, order) in enumerate(orders.items()):
        preds = fig11["predictions"][name]
        warp, sgd = (torch.tensor(v) for v in preds.values())
        for row, sub in enumerate(order):
            ax = axes[row, col]
            ax.axvspan(-5 + 2 * sub, -3 + 2 * sub, color="C0", alpha=0.12)
            ax.plot(x, truth, color="black", lw=1.5, label="ground truth")
            ax.plot(x, warp[0], "--", color="green", lw=1, label="before adaptation")
            ax.plot(x, sgd[row + 1], ":", color="grey", lw=1, label=f"after ({list(preds)[1]})")
            ax.plot(x, warp[row + 1], color="red", lw=1.2, label="after (WarpGrad)")
            ax.set_title(f"{name} {order}: after sub-task {sub} (#{row + 1})", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("x")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fig11.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    harness.cli(main)
