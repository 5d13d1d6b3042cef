"""A meta-training run checkpointed mid meta-batch and resumed in a fresh process (issue 14, item 7).

Used by ``tests/test_loop_moves.py``: the test runs ``run(stop=...)`` in its own process and
this file as a script (``python resume_run.py CHECKPOINT RESULT [--drop-rng]``) to resume.
The run exercises everything a checkpoint must carry: dropout (the global RNG: the loop, Leap's
probe and the replay draw from it), a generator, a list and a callable as task data, a
scheduler changing the lr and gradient clipping inside each task, Adam as meta optimizer.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

import warpopt

META_BATCH, META_STEPS, STEPS = 3, 2, 4
loss_fn = nn.functional.mse_loss


def build(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    model = warpopt.warp(net.double())
    return model, warpopt.WarpGradMetaOptimizer(model, lr=0.1, momentum=0.5, meta_lr=1e-2)


def task_data(i: int) -> list:
    """Task i's batches, from its own seed (a dataset would re-create them the same way)."""
    g = torch.Generator().manual_seed(100 + i)
    w = torch.randn(3, 1, generator=g, dtype=torch.float64)
    xs = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return [(x, torch.sin(x @ w)) for x in xs]


def kind(i: int) -> str:
    return ("generator", "list", "callable")[i % 3]


def adapt(opt, model, i: int) -> None:
    data = task_data(i)
    source = {"generator": (b for b in data), "list": data, "callable": lambda k: data[k % len(data)]}[kind(i)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    with opt.task(source, loss_fn, name=f"task {i}") as task:
        loop = task if kind(i) == "generator" else data if kind(i) == "list" else (source(k) for k in range(STEPS))
        for x, y in loop:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.clip_grad_norm_(0.5)
            opt.step()
            scheduler.step()


def reattach(i: int) -> warpopt.Task:
    """What a resumed run passes back for pending task i: its loss and, unless it was one-shot
    (its batches are in the checkpoint), its data."""
    data = task_data(i)
    source = {"generator": None, "list": data, "callable": lambda k: data[k % len(data)]}[kind(i)]
    return warpopt.Task(source, loss_fn, name=f"task {i}")


def run(opt, model, start: int = 0, stop: int = META_BATCH * META_STEPS) -> list[float]:
    """Tasks ``start .. stop-1`` of the run, a meta-step after every META_BATCH of them."""
    losses = []
    for i in range(start, stop):
        adapt(opt, model, i)
        if (i + 1) % META_BATCH == 0:
            losses.append(opt.meta_step()["meta_loss"])
    return losses


def result(opt, model, losses) -> dict:
    return {"phi": [p.detach().clone() for p in model.warp_parameters()],
            "theta0": [t.detach().clone() for t in opt.theta0], "losses": losses}


def main(argv: list[str]) -> None:
    checkpoint, out = argv[0], argv[1]
    saved = torch.load(checkpoint, weights_only=True)  # tensors and plain data only: no code runs
    model, opt = build(seed=123)  # a different model: everything must come from the checkpoint
    torch.manual_seed(123)  # and a different RNG
    model.load_state_dict(saved["model"])
    state = saved["opt"]
    if "--drop-rng" in argv:
        del state["rng"]
    pending = state["pending"]["tasks"]
    opt.load_state_dict(state, tasks=[reattach(int(t["name"].split()[1])) for t in pending])
    losses = run(opt, model, start=saved["next_task"])
    torch.save(result(opt, model, losses), out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
