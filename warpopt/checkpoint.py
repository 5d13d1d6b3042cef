"""State I/O of ``WarpGradMetaOptimizer``: snapshots out, validated loads in.

``state_dict`` returns deep copies (later training never mutates a saved dict), between any
two tasks or any two steps of a task. Mid meta-batch it holds the pending work too (``"pending"``): the replay buffer's
points as tensors (θ_k, optimizer state, buffers; one copy of the buffer, on the CPU), what
each step used (``warpopt.step_hypers``) and, per pending task, where its draws stand
(``Task.state_dict``): the tape of a one-shot source (its batches, saved as they are), the
position in a re-iterable, nothing for a callable. Loss functions, callables and iterators are
code, which a checkpoint does not hold (loading a file never executes code): ``load_state_dict``
takes them back as ``tasks=[Task, ...]``, one per pending task in the order they were adapted.
``include_rng=True`` adds the global torch RNG state (and CUDA's), so a resumed run is
bit-identical to an uninterrupted one.

Between two steps of a task, ``"task_in_progress"`` holds the running task too
(``warpopt.task_checkpoint``: its points so far, one more copy on the CPU, θ_k, θ_0, the abort
snapshot, the θ0 learner's state, the loop's batches); ``load_state_dict`` checks it with the rest
and leaves the task pending (``opt._resumed``) for the next ``opt.task()`` to continue.

``load_state_dict`` checks the whole dict against the optimizer's configuration (algorithm,
objective, θ0 learner, task and meta optimizer classes and hyper-parameter keys, parameter
names, shapes and dtypes, pending points and tasks) before writing anything, and a failure
while writing puts back what was already written: a mismatch raises a ``ValueError`` naming
the field and nothing changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from . import task_checkpoint
from .algorithms import Accumulator, Algorithm
from .initialisation import InitialisationLearner
from .meta_update import Contributions, MetaParameters
from .partition import Model
from .session import TaskRun
from .state_fit import (
    check_count,
    check_hypers,
    check_optimizer_state,
    check_points,
    check_replay_state,
    check_task_state,
    check_tensors,
)
from .tasks import Task
from .trajectory import ReplayBuffer


class WarpGradMetaOptimizer(Protocol):
    """What this module reads and writes of the optimizer (no import of the shell: no cycle)."""

    core: Model
    meta: MetaParameters
    algorithm: Algorithm
    initialisation: InitialisationLearner
    objective: Any
    replay: ReplayBuffer
    algorithm_state: Accumulator
    contributions: Contributions
    counters: dict[str, int]
    _run: TaskRun | None
    _resumed: dict[str, Any] | None


__all__ = ["state_dict", "load_state_dict", "config", "validate"]

KEYS = (
    "config",
    "task",
    "warp_optimizer",
    "init_optimizer",
    "theta0",
    "initial_buffers",
    "warp",
    "learned",
    "algorithm_state",
    "contributions",
    "replay",
    "counters",
)


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


def _tensors(ts: Iterable[torch.Tensor]) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(t.shape), str(t.dtype)) for t in ts]


def _group_keys(optimizer: torch.optim.Optimizer | None) -> list[list[str]] | None:
    # The optimizer's own hyper-parameters: keys a scheduler adds (``initial_lr``) do not count.
    return (
        None
        if optimizer is None
        else [sorted(k for k in g if k != "params" and k in optimizer.defaults) for g in optimizer.param_groups]
    )


def config(opt: WarpGradMetaOptimizer) -> dict[str, Any]:
    """What a state dict must agree with to be loaded into ``opt``."""
    core, meta = opt.core, opt.meta
    return {
        "algorithm": type(opt.algorithm).__qualname__,
        "objective": _name(opt.objective),
        "initialisation": type(opt.initialisation).__qualname__,
        "task_optimizer": type(core.task_optimizer).__qualname__,
        "task_hyperparameters": _group_keys(core.task_optimizer),
        "meta_optimizer": None if meta.warp_optimizer is None else type(meta.warp_optimizer).__qualname__,
        "meta_hyperparameters": _group_keys(meta.warp_optimizer),
        "init_optimizer": None if meta.init_optimizer is None else type(meta.init_optimizer).__qualname__,
        "init_hyperparameters": _group_keys(meta.init_optimizer),
        "adapt_parameters": list(core.adapt_names),
        "theta0": _tensors(meta.theta0),
        "warp": _tensors(meta.warp),
        "initial_buffers": list(zip(core.buffer_names, _tensors(core.initial_buffers))),
        "learned": sorted(meta.learned),
    }


def _clone(x: Any) -> Any:
    return copy.deepcopy(x)


def state_dict(opt: WarpGradMetaOptimizer, include_rng: bool = False) -> dict[str, Any]:
    running = None
    if opt._run is not None:  # between two steps of a task: the task in progress (warpopt.task_checkpoint)
        running = _clone(task_checkpoint.save(opt.core, opt._run))
    elif opt._resumed is not None:  # loaded, not yet continued: saved again as it was
        running = _clone(opt._resumed)
    sd = _snapshot(opt)
    if running is not None and "optimizer" not in running:
        running["optimizer"] = sd["task"]  # the task optimizer at step k (one object: saved once)
    sd["task_in_progress"] = running
    if include_rng:
        sd["rng"] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        }
    return sd


def _pending(replay: ReplayBuffer) -> dict[str, Any] | None:
    if not len(replay):
        return None
    contents, tasks = replay.contents(), replay.tasks
    return {"contents": contents, "tasks": [_clone(tasks[i].state_dict()) for i in contents["tasks"]]}


def _snapshot(opt: WarpGradMetaOptimizer) -> dict[str, Any]:
    acc, contrib = opt.algorithm_state, opt.contributions
    return {
        "config": config(opt),
        "task": _clone(opt.core.task_optimizer.state_dict()),
        "warp_optimizer": None if opt.meta.warp_optimizer is None else _clone(opt.meta.warp_optimizer.state_dict()),
        "init_optimizer": None if opt.meta.init_optimizer is None else _clone(opt.meta.init_optimizer.state_dict()),
        "theta0": [t.detach().clone() for t in opt.meta.theta0],
        "initial_buffers": [b.clone() for b in opt.core.initial_buffers],
        "warp": [p.detach().clone() for p in opt.meta.warp],
        "learned": {k: v.detach().clone() for k, v in opt.meta.learned.items()},
        "algorithm_state": {"total": None if acc.total is None else [t.clone() for t in acc.total], "count": acc.count},
        "contributions": {
            "total": None if contrib.total.total is None else [t.clone() for t in contrib.total.total],
            "count": contrib.total.count,
            "by_task": [(i, [t.clone() for t in g]) for i, g in contrib.by_task],
        },
        "replay": _clone(opt.replay.state_dict()),
        "counters": dict(opt.counters),
        "pending": _pending(opt.replay),
    }


def validate(opt: WarpGradMetaOptimizer, sd: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``sd`` that does not fit ``opt``."""
    if not isinstance(sd, dict):
        raise ValueError(f"not a WarpGradMetaOptimizer state_dict: got {type(sd).__name__}")
    missing = [k for k in KEYS if k not in sd]
    if missing:
        raise ValueError(f"not a WarpGradMetaOptimizer state_dict: missing {missing}")
    mine = config(opt)
    for key, value in mine.items():
        saved = sd["config"].get(key, "<missing>")
        if isinstance(saved, list):  # tuples become lists through some serialisers
            saved = [list(x) if isinstance(x, tuple) else x for x in saved]
            value = [list(x) if isinstance(x, tuple) else x for x in value]
        if saved != value:
            raise ValueError(
                f"state_dict config {key!r} is {saved!r}, this optimizer has {value!r}: it was saved "
                "by a differently configured optimizer"
            )
    check_optimizer_state("task", sd["task"], opt.core.task_optimizer)
    check_optimizer_state("warp_optimizer", sd["warp_optimizer"], opt.meta.warp_optimizer)
    check_optimizer_state("init_optimizer", sd["init_optimizer"], opt.meta.init_optimizer)
    check_tensors("theta0", sd["theta0"], opt.meta.theta0)
    check_tensors("warp", sd["warp"], opt.meta.warp)
    check_tensors("initial_buffers", sd["initial_buffers"], opt.core.initial_buffers)
    if set(sd["learned"]) != set(opt.meta.learned):
        raise ValueError(
            f"state_dict field 'learned': {sorted(sd['learned'])}, this optimizer {sorted(opt.meta.learned)}"
        )
    check_replay_state("replay", sd["replay"])
    counters = sd["counters"]
    if not isinstance(counters, dict) or set(counters) != set(opt.counters):
        raise ValueError(f"state_dict field 'counters': expected the keys {sorted(opt.counters)}")
    for key, value in counters.items():
        check_count(f"counters.{key}", value)
    for field in ("algorithm_state", "contributions"):
        if not isinstance(sd[field], dict):
            raise ValueError(f"state_dict field {field!r} is malformed")
        check_count(f"{field}.count", sd[field].get("count"))
        total = sd[field]["total"]
        if total is not None:
            live = opt.meta.phi if field == "algorithm_state" else opt.meta.theta0
            check_tensors(field, total, [p.detach() for p in live])
    _check_rng(sd.get("rng"))
    _check_running(opt, sd.get("task_in_progress"))


def _check_running(opt: WarpGradMetaOptimizer, running: Any) -> None:
    """A task in progress (``warpopt.task_checkpoint.save``) must fit the model and the θ0 learner."""
    if running is None:
        return
    try:
        _check_running_fields(opt, running)
    except (TypeError, KeyError, AttributeError, IndexError) as error:
        raise ValueError(f"state_dict field 'task_in_progress' is malformed ({error!r})") from None


def _check_running_fields(opt: WarpGradMetaOptimizer, running: Any) -> None:
    field = "task_in_progress"
    if not isinstance(running, dict) or not set(task_checkpoint.KEYS) <= set(running):
        missing = sorted(set(task_checkpoint.KEYS) - set(running)) if isinstance(running, dict) else "all"
        raise ValueError(f"state_dict field {field!r} is malformed (missing {missing})")
    steps = running["steps"]
    if type(steps) is not int or steps < 0 or not isinstance(running["learn"], bool):
        raise ValueError(f"state_dict field {field!r}: steps {steps!r} / learn {running['learn']!r} malformed")
    if not isinstance(running["name"], (str, type(None))):
        raise ValueError(f"state_dict field {field + '.name'!r}: a str or None expected, got {running['name']!r}")
    theta0, buffers = [p.detach() for p in opt.meta.theta0], opt.core.initial_buffers
    for key, live in (("params", theta0), ("buffers", buffers), ("start", theta0), ("start_buffers", buffers)):
        check_tensors(f"{field}.{key}", running[key], live)
    restore = running["restore"]
    if not isinstance(restore, dict):
        raise ValueError(f"state_dict field {field + '.restore'!r} is malformed")
    check_tensors(f"{field}.restore.params", restore.get("params"), theta0)
    check_tensors(f"{field}.restore.buffers", restore.get("buffers"), buffers)
    for key in ("optimizer", "restore_optimizer"):
        check_optimizer_state(f"{field}.{key}", running[key], opt.core.task_optimizer)
    finite = running["finite"]
    if not isinstance(finite, torch.Tensor) or finite.dtype != torch.bool or finite.dim():
        raise ValueError(f"state_dict field {field + '.finite'!r}: a 0-dim bool tensor expected")
    check_count(f"{field}.algorithm_state.count", running["algorithm_state"]["count"])
    total = running["algorithm_state"]["total"]
    if total is not None:
        check_tensors(f"{field}.algorithm_state", total, [p.detach() for p in opt.meta.phi])
    hypers = running["hypers"]
    if not isinstance(hypers, list) or len(hypers) != steps:
        raise ValueError(f"state_dict field {field + '.hypers'!r}: one entry per step taken ({steps}) expected")
    for k, h in enumerate(hypers):
        check_hypers(f"{field}.hypers[{k}]", h)
    trajectory = running["trajectory"]
    if trajectory is not None:
        for k, h in trajectory["hypers"].items():
            check_hypers(f"{field}.trajectory.hypers[{k}]", h)
        check_points(f"{field}.trajectory.points", trajectory.get("points"), theta0, buffers)
        if any(int(point["step"]) > steps for point in trajectory["points"]):
            raise ValueError(f"state_dict field {field + '.trajectory'!r}: a point past step {steps}")
    if running["learn"]:
        task_checkpoint.decode(opt.initialisation, running["init_state"])
    task, progress = running["task"], running["progress"]
    try:
        check_task_state(task)
    except ValueError as error:
        raise ValueError(f"state_dict field {field + '.task'!r}: {error}") from None
    if (
        not isinstance(progress, dict)
        or not isinstance(progress.get("seen"), list)
        or type(progress.get("loop")) is not int
    ):
        raise ValueError(f"state_dict field {field + '.progress'!r} is malformed")
    if (running["loop"] is not None) != bool(
        running["learn"] and (opt.initialisation.unrolls or opt.initialisation.needs_loss)
    ):
        raise ValueError(f"state_dict field {field + '.loop'!r} does not fit {opt.initialisation!r}")
    if running["loop"] is not None and opt.initialisation.unrolls:
        _check_loop_rng(running["loop"], steps, field + ".loop")


def _check_rng(rng: Any, field: str = "rng") -> None:
    if rng is None:
        return
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor) or rng["cpu"].dtype != torch.uint8:
        raise ValueError(
            f"state_dict field {field!r}: expected {{'cpu': a uint8 tensor, 'cuda': [uint8 tensors] or None}}"
        )
    cuda = rng.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    ):
        raise ValueError(f"state_dict field {field + '.cuda'!r}: expected a list of uint8 tensors or None")


def _check_loop_rng(loop: Any, steps: int, field: str) -> None:
    """MAML's per-step RNG states (absent from older checkpoints): one per step taken."""
    if not isinstance(loop, dict):
        raise ValueError(f"state_dict field {field!r} is malformed")
    rngs = loop.get("rng")
    if rngs is not None:
        if not isinstance(rngs, list) or len(rngs) != steps or any(r is None for r in rngs):
            raise ValueError(f"state_dict field {field + '.rng'!r}: one RNG state per step taken ({steps}) expected")
        for k, r in enumerate(rngs):
            _check_rng(r, f"{field}.rng[{k}]")
    pending = loop.get("pending")
    if pending is not None:
        if not isinstance(pending, dict) or "meta_batch" not in pending:
            raise ValueError(f"state_dict field {field + '.pending'!r} is malformed")
        _check_rng(pending.get("rng"), f"{field}.pending.rng")


def _check_pending(opt: WarpGradMetaOptimizer, pending: Any, tasks: Sequence[Task] | None) -> None:
    """The pending points must fit the model; ``tasks`` must re-attach every pending task."""
    if pending is None:
        if tasks:
            raise ValueError(f"tasks=: this state_dict holds no pending tasks, got {len(tasks)}")
        return
    try:
        contents, saved_tasks = pending["contents"], pending["tasks"]
        points, ids = contents["points"], list(contents["tasks"])
        int(contents["next_id"]), dict(contents["hypers"])
    except (TypeError, KeyError) as error:
        raise ValueError(f"state_dict field 'pending' is malformed ({error!r})") from None
    if not isinstance(saved_tasks, list) or len(saved_tasks) != len(ids):
        raise ValueError("state_dict field 'pending': one task state per pending task expected")
    n = len(ids)
    if tasks is None:
        raise ValueError(
            f"this state_dict was saved mid meta-batch: {n} adapted task(s) wait for meta_step(). Their "
            "loss functions and data sources are code, which a checkpoint does not hold: pass "
            "load_state_dict(sd, tasks=[warpopt.Task(data, loss_fn), ...]), one per pending task in the "
            "order they were adapted (one-shot data: Task(None, loss_fn); the saved batches are used)"
        )
    tasks = list(tasks)
    if len(tasks) != n or not all(isinstance(t, Task) for t in tasks) or len({id(t) for t in tasks}) != n:
        raise ValueError(
            f"tasks=: expected {n} distinct warpopt.Task objects (one per pending task, in the order they "
            f"were adapted), got {len(tasks)}: {[type(t).__name__ for t in tasks][:5]}"
        )
    for i, (task, saved) in enumerate(zip(tasks, saved_tasks)):
        name = saved.get("name") if isinstance(saved, dict) else None
        if name is not None and task.name is not None and name != task.name:
            raise ValueError(f"tasks=[{i}] is named {task.name!r}, the pending task {i} was {name!r}")
        try:
            task.check_state(saved)
        except ValueError as error:
            raise ValueError(f"tasks=[{i}]: {error}") from None
    for j, point in enumerate(points):
        if not isinstance(point, dict) or point.get("task") not in ids:
            raise ValueError(f"state_dict field {f'pending.points[{j}]'!r}: no task of the pending tasks")
    check_points("pending.points", points, [p.detach() for p in opt.meta.theta0], opt.core.initial_buffers)


def load_state_dict(opt: WarpGradMetaOptimizer, sd: dict[str, Any], tasks: Sequence[Task] | None = None) -> None:
    if opt._run is not None:
        raise RuntimeError("load_state_dict() inside a task: call it outside the `with opt.task(...)` block")
    validate(opt, sd)
    _check_pending(opt, sd.get("pending"), tasks)
    sd = copy.deepcopy(sd)  # the caller's dict stays theirs
    undo, live_tasks = _snapshot(opt), opt.replay.tasks
    undo_tasks = None if undo["pending"] is None else [live_tasks[i] for i in undo["pending"]["contents"]["tasks"]]
    try:
        _write(opt, sd, tasks)
    except BaseException:
        _write(opt, undo, undo_tasks)
        raise
    # The next opt.task() continues it (warpopt.task_checkpoint.resume); nothing above may fail after this.
    opt._resumed = sd.get("task_in_progress")


def _restore_pending(opt: WarpGradMetaOptimizer, pending: dict[str, Any] | None, tasks: Sequence[Task] | None) -> None:
    if pending is None:
        opt.replay.clear()
        return
    ids = [int(i) for i in pending["contents"]["tasks"]]
    for task, saved in zip(tasks or (), pending["tasks"]):
        task.load_state_dict(saved)
    opt.replay.restore(pending["contents"], dict(zip(ids, tasks or ())), opt.core.adapt[0].device)


def _write(opt: WarpGradMetaOptimizer, sd: dict[str, Any], tasks: Sequence[Task] | None = None) -> None:
    meta, core = opt.meta, opt.core
    with torch.no_grad():
        for dst, src in zip(
            meta.theta0 + meta.warp + core.initial_buffers, sd["theta0"] + sd["warp"] + sd["initial_buffers"]
        ):
            dst.copy_(src)
        for k, v in sd["learned"].items():
            meta.learned[k].copy_(v)
    opt.core.task_optimizer.load_state_dict(sd["task"])
    if meta.warp_optimizer is not None:
        meta.warp_optimizer.load_state_dict(sd["warp_optimizer"])
    if meta.init_optimizer is not None:
        meta.init_optimizer.load_state_dict(sd["init_optimizer"])
    acc, contrib = sd["algorithm_state"], sd["contributions"]
    opt.algorithm_state = Accumulator(None if acc["total"] is None else tuple(acc["total"]), acc["count"])
    opt.contributions = Contributions(
        Accumulator(None if contrib["total"] is None else tuple(contrib["total"]), contrib["count"]),
        tuple((i, tuple(g)) for i, g in contrib["by_task"]),
    )
    _restore_pending(opt, sd.get("pending"), tasks)
    opt.replay.load_state_dict(sd["replay"])
    opt.counters = dict(sd["counters"])
    rng = sd.get("rng")
    if rng is not None:  # last: nothing after it can fail
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            for i, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, i)
