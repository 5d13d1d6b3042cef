"""Meta-training runs checkpointed *inside a task* (between two of its steps) and resumed in a
fresh process (issue 14, item 7: checkpoints anywhere).

Used by ``tests/test_task_checkpoint.py``: the test runs ``run(config, interrupt=...)`` in its
own process and this file as a script (``python resume_task_run.py CHECKPOINT RESULT``) to
resume every configuration saved in CHECKPOINT. Each run has a generator, a list and a callable
as task data (the loop reads the generator through the task, the list and the callable itself),
a learning-rate scheduler and gradient clipping in every task, momentum, Adam as meta optimizer;
dropout where the configuration allows it (the global RNG: the loop, Leap's probe and the replay
draw from it).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

import warpopt

META_BATCH, META_STEPS, STEPS = 3, 2, 4
loss_fn = nn.functional.mse_loss

# name: (algorithm, θ0 learner, dropout, the interrupted task, the steps it took before the checkpoint)
CONFIGS = {
    "online-leap": (warpopt.online, warpopt.leap, 0.2, 3, 2),  # Alg. 1: per-step warp gradients pending
    "offline-leap": (warpopt.offline, warpopt.leap, 0.2, 4, 2),  # Alg. 2: a pending task's points too
    "offline-probe": (warpopt.offline, lambda: warpopt.leap(loss="probe"), 0.2, 5, 1),  # Leap's probe batch
    "offline-maml": (warpopt.offline, warpopt.maml, 0.0, 4, 3),  # MAML's in-loop trajectory rebuilt
    "online-maml": (warpopt.online, warpopt.maml, 0.0, 3, 2),  # Warp-MAML: its pending Eq. 7 term too
    # MAML with dropout: the rebuilt trajectory draws the loop's masks (each step's RNG state saved)
    "dropout-maml": (warpopt.offline, warpopt.maml, 0.2, 4, 2),
    "dropout-warp-maml": (warpopt.online, warpopt.maml, 0.2, 3, 1),  # and the pending Eq. 7 term's
    "continual-reptile": (lambda: warpopt.continual(every=3), warpopt.reptile, 0.2, 4, 2),  # φ updated mid-task
}


def build(config: str, seed: int = 0):
    algorithm, initialisation, dropout, _, _ = CONFIGS[config]
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(3, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
    )
    model = warpopt.warp(net.double())
    opt = warpopt.WarpGradMetaOptimizer(
        model, lr=0.1, momentum=0.5, meta_lr=1e-2, algorithm=algorithm(), initialisation=initialisation()
    )
    return model, opt


def task_data(i: int) -> list:
    """Task i's batches, from its own seed (a dataset would re-create them the same way)."""
    g = torch.Generator().manual_seed(100 + i)
    w = torch.randn(3, 1, generator=g, dtype=torch.float64)
    xs = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return [(x, torch.sin(x @ w)) for x in xs]


def kind(i: int) -> str:
    return ("generator", "list", "callable")[i % 3]


def source(i: int, read: int = 0):
    """Task i's data; a generator resumes after the ``read`` batches the task had read."""
    data = task_data(i)
    return {"generator": (b for b in data[read:]), "list": data, "callable": lambda k: data[k % len(data)]}[kind(i)]


class Interrupted(Exception):
    pass


def adapt(opt, model, i: int, stop: int | None = None, resume: dict | None = None) -> dict | None:
    """Task i; with ``stop``, a checkpoint after ``stop`` steps (returned; the task is abandoned);
    with ``resume`` (the checkpoint's scheduler state), the interrupted task continued."""
    data = task_data(i)
    read = 0 if resume is None else opt.task_in_progress["batches_read"] or 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    if resume is not None:
        scheduler.load_state_dict(resume["scheduler"])
    saved = {}
    try:
        with opt.task(source(i, read), loss_fn, name=f"task {i}") as task:
            k0 = task.start_step
            loop = {"generator": task, "list": data[k0:], "callable": (data[k] for k in range(k0, STEPS))}[kind(i)]
            for k, (x, y) in enumerate(loop, start=k0):
                if k == stop:  # at the top of the loop body: the generator's batch k is already taken
                    saved = {"opt": opt.state_dict(include_rng=True), "scheduler": scheduler.state_dict()}
                    raise Interrupted
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.clip_grad_norm_(0.5)
                opt.step()
                scheduler.step()
    except Interrupted:
        return saved
    return None


def reattach(i: int) -> warpopt.Task:
    """A pending (finished) task passed back: its loss, and its data unless one-shot (saved)."""
    return warpopt.Task(None if kind(i) == "generator" else source(i), loss_fn, name=f"task {i}")


def run(opt, model, start: int = 0, stop: int = META_BATCH * META_STEPS, interrupt: tuple | None = None):
    """Tasks ``start .. stop-1``, a meta-step after every META_BATCH of them; ``interrupt=(i, k)``
    returns the checkpoint taken in task i after k steps (with the model's state)."""
    losses = []
    for i in range(start, stop):
        if interrupt is not None and i == interrupt[0]:
            saved = adapt(opt, model, i, stop=interrupt[1])
            return {**saved, "model": model.state_dict(), "task": i, "losses": losses}
        adapt(opt, model, i)
        if (i + 1) % META_BATCH == 0:
            losses.append(opt.meta_step()["meta_loss"])
    return losses


def result(opt, model, losses) -> dict:
    return {
        "phi": [p.detach().clone() for p in model.warp_parameters()],
        "theta0": [t.detach().clone() for t in opt.theta0],
        "meta_optimizer": opt.meta_optimizer.state_dict(),
        "init_optimizer": opt.init_optimizer.state_dict(),
        "counters": dict(opt.counters),
        "losses": losses,
    }


def checkpoint(config: str) -> dict:
    model, opt = build(config)
    _, _, _, i, k = CONFIGS[config]
    return run(opt, model, interrupt=(i, k))


def resume(config: str, saved: dict) -> dict:
    model, opt = build(config, seed=123)  # a different model: everything must come from the checkpoint
    torch.manual_seed(123)  # and a different RNG
    model.load_state_dict(saved["model"])
    state = saved["opt"]
    pending = [int(t["name"].split()[1]) for t in state["pending"]["tasks"]] if state["pending"] else []
    opt.load_state_dict(state, tasks=[reattach(j) for j in pending] or None)
    i = saved["task"]
    adapt(opt, model, i, resume=saved)
    losses = list(saved["losses"])
    if (i + 1) % META_BATCH == 0:
        losses.append(opt.meta_step()["meta_loss"])
    return result(opt, model, losses + run(opt, model, start=i + 1))


def main(argv: list[str]) -> None:
    saved = torch.load(argv[0], weights_only=True)  # tensors and plain data only: no code runs
    torch.save({config: resume(config, entry) for config, entry in saved.items()}, argv[1])


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
