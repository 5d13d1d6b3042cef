"""A task in progress, checkpointed between two of its steps and resumed (issue 14, item 7).

``save`` turns a running task (``warpopt.session.TaskRun``) after k steps into tensors and plain
containers (``torch.load(weights_only=True)`` reads them back; nothing in it is code): the live
θ_k and adapt buffers, where the task started (θ_0 and its buffers), what aborting it restores
(θ, buffers and the task optimizer's state before the task began), the points recorded so far,
what each step used (``warpopt.step_hypers``), the tentative algorithm accumulator (online
per-step warp gradients), the θ0 learner's per-task state (``LeapState``: its tensors, probe
batch and last loss), the task's draws (``Task.state_dict``) and the batches its loop took
(``Task.progress_state``), and for MAML's in-loop trajectory what rebuilding it needs.

``resume`` starts the same task again at step k: θ_0 and its buffers are put back so that the
session begins where the interrupted task began (hooks, frozen φ, the loop's view), then the
saved state replaces what a fresh start would have made, and θ_k, the buffers and the task
optimizer's state at step k are written. The θ0 learner's ``begin_task`` is not called (Leap's
probe is not drawn again). MAML's differentiable trajectory θ_0 → θ_k (an autograd graph, which
no file holds) is rebuilt by a differentiable replay of the k steps on the loop's saved batches
with each step's recorded hyper-parameters, under a forked RNG (the global RNG stays as saved).

What cannot be saved comes back with the task passed to ``opt.task()`` on resume: the loss
functions, and the data from step k on (see ``Task.resume``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

from .algorithms import Accumulator, Algorithm
from .initialisation import InitialisationLearner
from .loop import RNGState, set_rng_state
from .objectives import Objective
from .partition import Model
from .points import point_from_plain, point_to_plain
from .session import TaskRun, abort, begin, finish
from .step_hypers import from_plain, to_plain
from .tasks import Task
from .trajectory import ReplayBuffer

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

__all__ = ["save", "resume", "discard", "info", "encode", "decode", "check_task"]

KEYS = (
    "name",
    "steps",
    "learn",
    "params",
    "buffers",
    "start",
    "start_buffers",
    "restore",
    "restore_optimizer",
    "optimizer",
    "finite",
    "algorithm_state",
    "trajectory",
    "hypers",
    "init_state",
    "task",
    "progress",
    "loop",
)


def _clones(ts: Any) -> list[torch.Tensor]:
    return [t.detach().clone() for t in ts]


# ---------------------------------------------------------------------- the θ0 learner's state
def encode(x: Any, where: str = "init_state") -> Any:
    """A θ0 learner's per-task state as tensors and tagged plain containers: tensors (cloned),
    numbers, strings, None, lists, tuples, dicts and NamedTuples (by class name and fields)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        cls = type(x)
        fields = {f: encode(getattr(x, f), f"{where}.{f}") for f in x._fields}
        return {"namedtuple": cls.__qualname__, "module": cls.__module__, "fields": fields}
    if isinstance(x, (list, tuple)):
        return type(x)(encode(v, f"{where}[{i}]") for i, v in enumerate(x))
    if isinstance(x, dict) and all(isinstance(k, (str, int)) for k in x):
        return {"dict": {k: encode(v, f"{where}[{k!r}]") for k, v in x.items()}}
    raise TypeError(
        f"state_dict() inside a task: the θ0 learner's per-task state holds a {type(x).__name__} at {where}, "
        "which a checkpoint loadable with torch.load(weights_only=True) cannot hold (tensors, numbers, "
        "strings, lists, tuples, dicts and NamedTuples only; a probe batch must be made of them too): "
        "checkpoint between tasks instead"
    )


def _state_class(learner: InitialisationLearner, module: Any, name: Any) -> type:
    """The NamedTuple class ``module.name``, looked up (never imported) among the modules that
    define the learner's class and its bases: a file names a class, it cannot make one."""
    for base in type(learner).__mro__:
        if base.__module__ == module and module in sys.modules:
            cls = getattr(sys.modules[module], str(name), None)
            if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields"):
                return cls
    raise ValueError(f"state_dict field 'task_in_progress.init_state': a {module}.{name} is not a state of {learner!r}")


def decode(learner: InitialisationLearner, x: Any, where: str = "init_state") -> Any:
    """Inverse of ``encode`` (``ValueError`` naming the field when ``x`` was not made by it)."""
    if isinstance(x, (list, tuple)):
        return type(x)(decode(learner, v, f"{where}[{i}]") for i, v in enumerate(x))
    if not isinstance(x, dict):
        return x
    if set(x) == {"dict"} and isinstance(x["dict"], dict):
        return {k: decode(learner, v, f"{where}[{k!r}]") for k, v in x["dict"].items()}
    if set(x) == {"namedtuple", "module", "fields"} and isinstance(x["fields"], dict):
        cls = _state_class(learner, x["module"], x["namedtuple"])
        if set(x["fields"]) != set(cls._fields):  # type: ignore[attr-defined]
            raise ValueError(
                f"state_dict field 'task_in_progress.{where}': fields {sorted(x['fields'])}, "
                f"{cls.__qualname__} has {sorted(cls._fields)}"  # type: ignore[attr-defined]
            )
        return cls(**{f: decode(learner, v, f"{where}.{f}") for f, v in x["fields"].items()})
    raise ValueError(f"state_dict field 'task_in_progress.{where}' is malformed")


# ---------------------------------------------------------------------- save
def _plain_rng(state: RNGState | None) -> dict[str, Any] | None:
    """An RNG state as ``state_dict()``'s ``rng`` field holds one."""
    if state is None:
        return None
    cpu, cuda = state
    return {"cpu": cpu.clone(), "cuda": [s.clone() for s in cuda] or None}


def save(model: Model, run: TaskRun) -> dict[str, Any]:
    """The task in progress after ``run.steps`` steps (see the module docstring). Raises a
    ``RuntimeError`` when it is not between two steps (a forward or clipping since the last step)."""
    loop = run.loop
    if model.clip is not None or (loop is not None and (loop.forwards or loop.graph_grads is not None)):
        raise RuntimeError(
            "state_dict() inside a task between the model's forward (or clip_grad_norm_) and opt.step(): "
            "a checkpoint holds the task between two steps; take it right after opt.step() (the "
            "gradients of a step not yet taken are not saved)"
        )
    acc, trajectory = run.algorithm_state, run.trajectory
    restore_params, restore_buffers, restore_optimizer = run.restore
    pending = (
        None
        if loop is None or loop.pending is None
        else {"meta_batch": loop.pending[2], "rng": _plain_rng(loop.pending_rng)}
    )
    return {
        "name": run.task.name,
        "steps": run.steps,
        "learn": run.learn,
        "params": _clones(run.params),
        "buffers": _clones(run.buffers),
        "start": _clones(run.theta0),
        "start_buffers": _clones(run.start_buffers),
        "restore": {"params": _clones(restore_params), "buffers": _clones(restore_buffers)},
        "restore_optimizer": restore_optimizer,
        "finite": run.finite.clone(),
        "algorithm_state": {"total": None if acc.total is None else _clones(acc.total), "count": acc.count},
        "trajectory": None
        if trajectory is None
        else {
            "points": [point_to_plain(p) for p in trajectory.points],
            "hypers": {k: to_plain(h) for k, h in trajectory.hypers.items()},
        },
        "hypers": [to_plain(h) for h in run.step_hypers],
        "init_state": encode(run.init_state),
        "task": run.task.state_dict(),
        "progress": run.task.progress_state(),
        "loop": None
        if loop is None
        else {
            "faithful": loop.faithful,
            "compare": [[u.clone(), d.clone()] for u, d in loop.compare],
            "pending": pending,
            "rng": [_plain_rng(r) for r in loop.rngs] if loop.unroll else None,  # MAML: each step's forward
        },
    }


def info(saved: dict[str, Any]) -> dict[str, Any]:
    """What a user needs to resume: the task's name, the steps taken, the kind of its data and
    how many batches the task had read from a one-shot source (its iterator resumes after them)."""
    tape = saved["task"]["tape"]
    return {
        "name": saved["name"],
        "steps": int(saved["steps"]),
        "kind": saved["task"]["kind"],
        "batches_read": None if tape is None else len(tape),
    }


# ---------------------------------------------------------------------- resume
class _Resumed(InitialisationLearner):
    """The θ0 learner as ``session.begin`` sees it on resume: its state is the saved one."""

    def __init__(self, learner: InitialisationLearner) -> None:
        self.unrolls, self.needs_loss = learner.unrolls, learner.needs_loss
        self.needs_previous, self.learns = learner.needs_previous, learner.learns


def check_task(task: Task, saved: dict[str, Any], learn: bool) -> None:
    """``ValueError`` when ``task`` (what ``opt.task()`` was given on resume) cannot continue ``saved``."""
    label = repr(saved["name"] or task.name or "")
    if saved["name"] is not None and task.name is not None and saved["name"] != task.name:
        raise ValueError(
            f"a task interrupted by a checkpoint is pending: {saved['name']!r} at step {saved['steps']}, and "
            f"opt.task() was given {task.name!r}. Continue it first (or opt.discard_task_in_progress())"
        )
    if bool(saved["learn"]) != learn:
        raise ValueError(f"task {label} was saved with learn={saved['learn']}: resume it the same way")
    if saved["task"]["kind"] == "one-shot" and task.kind not in ("one-shot", "none"):
        raise ValueError(
            f"task {label} was saved with one-shot data (a generator or iterator): resume it with an iterator "
            f"of the batches after the {len(saved['task']['tape'])} it had read (or None), not {task.kind} data"
        )
    task.check_state(saved["task"])
    task.check_resume(saved["progress"], int(saved["steps"]))


def resume(
    model: Model,
    task: Task,
    saved: dict[str, Any],
    *,
    algorithm: Algorithm,
    initialisation: InitialisationLearner,
    replay: ReplayBuffer,
    objective: Objective | None,
    learn: bool = True,
) -> TaskRun:
    """The session of ``saved`` (validated by ``warpopt.checkpoint``), continued with ``task``
    (``learn``: what ``opt.task()`` was given): all or nothing (on failure θ, buffers and the
    task optimizer are as they were)."""
    check_task(task, saved, learn)
    device, buffers = model.adapt[0].device, model.live_buffers()
    before = (_clones(model.adapt), _clones(buffers), model.task_optimizer.state_dict())

    def write(params: Any, bufs: Any) -> None:
        with torch.no_grad():
            for p, s in zip(model.adapt, params):
                p.copy_(s)
            for b, s in zip(buffers, bufs):
                b.copy_(s)

    write(saved["start"], saved["start_buffers"])  # the session begins where the task began
    model.task_optimizer.load_state_dict(saved["optimizer"])  # step k's groups, before begin reads them
    acc = saved["algorithm_state"]
    total = None if acc["total"] is None else tuple(t.to(device) for t in acc["total"])
    begun = model.tasks_begun
    try:
        run = begin(
            model,
            task,
            reset=False,
            learn=bool(saved["learn"]),
            algorithm=algorithm,
            initialisation=_Resumed(initialisation),
            replay=replay,
            algorithm_state=Accumulator(total, int(acc["count"])),
            objective=objective,
        )
    except BaseException:
        write(*before[:2])
        model.task_optimizer.load_state_dict(before[2])
        raise
    model.tasks_begun = begun  # counted when the task first began
    try:
        _continue(model, run, saved, initialisation, device)
    except BaseException:
        finish(model, run)
        abort(model, run)
        write(*before[:2])
        model.task_optimizer.load_state_dict(before[2])
        raise
    return run


def _continue(
    model: Model, run: TaskRun, saved: dict[str, Any], initialisation: InitialisationLearner, device: torch.device
) -> None:
    """Replace what ``begin`` made for a fresh start by the saved task at step k."""
    if run.guard is not None:  # the first-step check is for step 0 only (a diagnostic: not carried over)
        run.guard.remove()
        run.guard = None
    steps = int(saved["steps"])
    run.task.resume(saved["task"], saved["progress"], steps)
    restore = saved["restore"]
    run.restore = (
        [t.to(device) for t in restore["params"]],
        [b.to(device) for b in restore["buffers"]],
        saved["restore_optimizer"],
    )
    run.steps, run.finite = steps, saved["finite"].to(device)
    run.step_hypers = [from_plain(h) for h in saved["hypers"]]  # type: ignore[misc]
    run.hypers = run.step_hypers[-1] if run.step_hypers else None
    if run.trajectory is not None:
        trajectory = run.trajectory
        trajectory.discard()  # the θ_0 begin recorded: the saved points replace it
        trajectory.points.extend(
            point_from_plain(c, device, trajectory.dtype, trajectory.arena) for c in saved["trajectory"]["points"]
        )
        trajectory.hypers = {int(k): from_plain(h) for k, h in saved["trajectory"]["hypers"].items()}  # type: ignore[misc]
    if run.learn:
        run.init_state = decode(initialisation, saved["init_state"])
    with torch.no_grad():  # θ_k and the buffers where the task was
        for p, s in zip(run.params, saved["params"]):
            p.copy_(s)
        for b, s in zip(run.buffers, saved["buffers"]):
            b.copy_(s)
    if run.loop is not None and saved["loop"] is not None:
        _rebuild(run, saved["loop"])


def _rebuild(run: TaskRun, saved: dict[str, Any]) -> None:
    """The loop's view at step k; for MAML the differentiable trajectory θ_0 → θ_k (a graph of
    θ0, and for Warp-MAML of per-step aliases φ_j) and the pending Eq. 7 term, replayed on the
    loop's batches with each step's hyper-parameters (``warpopt.loop`` builds the same in the loop)."""
    loop, task = run.loop, run.task
    assert loop is not None
    loop.faithful = bool(saved["faithful"])
    loop.compare = [(u, d) for u, d in saved["compare"]]
    loop.step_index = run.steps
    if not loop.unroll:
        return
    # Each step's graph gradient is rebuilt by a forward drawing what the loop's forward drew: the
    # global RNG is set to the state recorded when that forward began (one per step, and one for
    # the pending Eq. 7 term), inside a fork, so the live RNG stays as the checkpoint left it.
    saved_rngs = saved.get("rng")  # absent from checkpoints written before it was recorded
    rngs: list[RNGState] | None = None
    if saved_rngs is not None and all(len(r["cuda"] or ()) == len(loop.cuda) for r in saved_rngs):
        rngs = [(r["cpu"], list(r["cuda"] or ())) for r in saved_rngs]
    pending = saved["pending"]
    pending_rng = None if pending is None or pending.get("rng") is None else pending["rng"]
    dropout = any(isinstance(m, _DROPOUT) and m.training and m.p > 0 for m in loop.module.modules())
    if run.steps and rngs is None and dropout:
        warnings.warn(
            "maml(): the resumed task's trajectory θ_0 → θ_k is rebuilt with fresh dropout masks (the "
            "checkpoint holds no RNG state per step for this device, written by an older version or on "
            "another device): its θ0 meta-gradient differs from an uninterrupted run's",
            RuntimeWarning,
            stacklevel=5,
        )
    theta, states, phi = loop.theta, loop.states, loop.phi
    with torch.random.fork_rng(devices=loop.cuda), torch.enable_grad():  # the saved RNG state stays
        for k in range(run.steps):
            phi = loop._alias_phi()
            if rngs is not None:
                set_rng_state(rngs[k], loop.cuda)
            grads = loop.functional_gradient(theta, phi, task.loop_batch(k))
            theta, states = run.context.apply_step(theta, grads, states, run.step_hypers[k])
        if pending is not None:
            meta_batch = pending["meta_batch"]
            if rngs is not None and pending_rng is not None:
                loop.pending_rng = (pending_rng["cpu"], list(pending_rng["cuda"] or ()))
                set_rng_state(loop.pending_rng, loop.cuda)
            loop.pending = (task.meta_loss(loop._functional(theta, phi), meta_batch), list(phi), meta_batch)
    if rngs is not None:
        loop.rngs = rngs
    loop.theta, loop.states, loop.phi = list(theta), list(states), loop._alias_phi()


def discard(model: Model, saved: dict[str, Any]) -> None:
    """Drop a pending interrupted task as an aborted one: θ, the adapt buffers and the task
    optimizer's state go back to before the task began."""
    restore = saved["restore"]
    with torch.no_grad():
        for p, s in zip(model.adapt, restore["params"]):
            p.copy_(s)
        for b, s in zip(model.live_buffers(), restore["buffers"]):
            b.copy_(s)
    model.task_optimizer.load_state_dict(saved["restore_optimizer"])
