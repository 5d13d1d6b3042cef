"""Quickstart: meta-learn warp layers for sine regression tasks (about 15 s on a CPU with --quick).

Held-out tasks adapt K SGD steps from one fixed initialisation through identity warps (plain SGD,
before meta-training) and through the meta-learned warps (after): warping should win.

    python examples/quickstart.py --quick
"""
import torch
from torch import nn

import harness
import warpopt

QUICK = {"meta_steps": 100, "eval_tasks": 50}


def sine_task(n=20):
    """y = a·sin(x − b): x ~ U[−5, 5], a ~ U[0.1, 5], b ~ U[0, π]; an infinite batch stream."""
    a, b = torch.empty(2).uniform_(0.1, 5.0), torch.empty(1).uniform_(0, torch.pi)

    def batch(k=0):
        x = torch.empty(n, 1).uniform_(-5, 5)
        return x, a[0] * torch.sin(x - b)
    return batch


def adapt(model, opt, task, steps, learn=True):
    """K SGD steps from θ0 through the warps; returns the training losses."""
    losses = []
    with opt.task(task, nn.functional.mse_loss, learn=learn):  # learn=False: evaluation only
        for k in range(steps):
            x, y = task(k)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def held_out_loss(model, opt, tasks, steps):
    losses = []
    for task in tasks:
        adapt(model, opt, task, steps, learn=False)
        x, y = task(-1)
        with torch.no_grad():
            losses.append(nn.functional.mse_loss(model(x), y).item())
    return sum(losses) / len(losses)


def parser():
    p = harness.ExampleParser("quickstart", __doc__, quick=QUICK, quick_help="100 meta-steps, 50 held-out tasks")
    p.add_argument("--meta-steps", type=int, default=300, help="meta-steps of 4 tasks each")
    p.add_argument("--steps", type=int, default=10, help="K, task adaptation steps")
    p.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    harness.start(args)
    harness.write_config(args, algorithm="offline (Algorithm 2), η = 10, vectorised replay",
                         objective="exact (Eq. 7)", initialisation="none (fixed random θ0)", lr=0.01, meta_lr=1e-3)

    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    model = warpopt.warp(net, layer=warpopt.MLPResidualWarp)       # residual MLP warps after each ReLU
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.01, meta_lr=1e-3, initialisation=warpopt.none(),
                                        algorithm=warpopt.offline(batch_size=10,  # replayed with vmap
                                                                  gradient=warpopt.vectorised.vectorised()))
    held_out = [sine_task() for _ in range(args.eval_tasks)]
    before = held_out_loss(model, opt, held_out, args.steps)
    history, watch = [], harness.Stopwatch()
    with watch:
        for _ in harness.bar(range(args.meta_steps), desc="quickstart", unit="meta-step"):
            losses = [sum(adapt(model, opt, task, args.steps)) / args.steps for task in [sine_task() for _ in range(4)]]
            opt.meta_step()
            history.append(sum(losses) / len(losses))
    after = held_out_loss(model, opt, held_out, args.steps)
    results = {"held_out_mse": {"sgd_identity_warp": before, "warpgrad": after}, "steps": args.steps,
               "eval_tasks": args.eval_tasks, "meta_train_seconds": watch.wall, "meta_train_cpu_seconds": watch.cpu,
               "meta_loss_history": history}
    harness.write_json(args.out, "results.json", results)
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    harness.plot_smoothed(ax, history, label="training loss")
    ax.axhline(after, color="C1", ls="--", label=f"held-out MSE after meta-training ({after:.3f})")
    ax.set(xlabel="meta-step", ylabel=f"mean task MSE over {args.steps} steps", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}/meta_loss.png", dpi=110)
    plt.close(fig)
    print(f"held-out MSE after {args.steps} steps: SGD (identity warp) {before:.3f}  WarpGrad {after:.3f} "
          f"({watch.wall:.0f} s meta-training)")
    if not after < before:
        raise RuntimeError(f"warping did not help: held-out MSE {after:.3f} vs {before:.3f} with plain SGD")
    return results


if __name__ == "__main__":
    harness.cli(main)
