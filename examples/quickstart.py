"""Quickstart: meta-learn warp layers for sine regression tasks (under a minute on a CPU).
Held-out tasks adapt K SGD steps from one fixed initialisation through identity warps (plain
SGD, before meta-training) and through the meta-learned warps (after): warping should win."""
import argparse

import torch
from torch import nn
import warpopt

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--meta-steps", type=int, default=100)
parser.add_argument("--steps", type=int, default=10, help="K, task adaptation steps")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)  # tiny layers: thread hand-offs cost more than they save (10x here)


def sine_task(n=20):
    """y = a·sin(x − b): x ~ U[−5, 5], a ~ U[0.1, 5], b ~ U[0, π]; an infinite batch stream."""
    a, b = torch.empty(2).uniform_(0.1, 5.0), torch.empty(1).uniform_(0, torch.pi)

    def batch(k=0):
        x = torch.empty(n, 1).uniform_(-5, 5)
        return x, a[0] * torch.sin(x - b)
    return batch


def adapt(model, opt, task, steps, learn=True):
    with opt.task(task, nn.functional.mse_loss, learn=learn):  # learn=False: evaluation only
        for k in range(steps):
            x, y = task(k)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()


def held_out_loss(model, opt, tasks):
    losses = []
    for task in tasks:
        adapt(model, opt, task, args.steps, learn=False)
        x, y = task(-1)
        with torch.no_grad():
            losses.append(nn.functional.mse_loss(model(x), y).item())
    return sum(losses) / len(losses)


net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
model = warpopt.warp(net, layer=warpopt.MLPResidualWarp)       # residual MLP warps after each ReLU
opt = warpopt.WarpGradMetaOptimizer(model, lr=0.01, meta_lr=1e-3, initialisation=warpopt.none(),
                                    algorithm=warpopt.offline(batch_size=10,  # replayed with vmap
                                                              gradient=warpopt.vectorised.vectorised()))
held_out = [sine_task() for _ in range(50)]
before = held_out_loss(model, opt, held_out)
for step in range(args.meta_steps):
    for task in [sine_task() for _ in range(4)]:
        adapt(model, opt, task, args.steps)
    opt.meta_step()
after = held_out_loss(model, opt, held_out)
print(f"held-out MSE after {args.steps} steps: SGD (identity warp) {before:.3f}  WarpGrad {after:.3f}")
assert after < before, "warping did not help"
