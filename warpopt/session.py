"""The task session: one task's adaptation (the inner loop of Algorithms 1-3).

``begin`` resets θ ← θ0 (unless the algorithm continues from the current θ), freezes φ and
starts recording; ``step`` is the recorded task update; ``end`` hands back what the task
produced (its trajectory, its online meta-gradient sum, its θ0 contribution) for the
meta-optimizer to commit; ``abort`` puts parameters, buffers and the task optimizer's state
back to where they were before ``begin``. Nothing here changes φ, θ0 or any meta state.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import step_check
from .algorithms import Accumulator, Algorithm
from .clipping import check_max_norm
from .initialisation import InitialisationLearner
from .loop import MOVED_IN_TASK, Loop
from .objectives import Objective, ReplayContext, exact, meta_gradient, module_modes
from .partition import Model
from .step_hypers import StepHypers, capture
from .task_optimizers import copy_state_dict
from .tasks import Task
from .trajectory import ReplayBuffer, Sample, Trajectory

__all__ = ["TaskRun", "TaskOutcome", "begin", "step", "end", "abort", "clip_grad_norm_"]


@dataclass
class TaskRun:
    """The live state of one task (a ``warpopt.initialisation.TaskView`` for θ0 learners)."""

    task: Task
    context: ReplayContext
    params: Sequence[torch.Tensor]
    buffers: list[torch.Tensor]
    theta0: list[torch.Tensor]
    start_buffers: list[torch.Tensor]
    learn: bool
    restore: tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]
    requires_grad: list[bool]
    finite: torch.Tensor  # set at the task's end from θ_K (``end``)
    steps: int = 0
    trajectory: Trajectory | None = None
    init_state: Any = None
    hook: Any = None
    algorithm_state: Accumulator = field(default_factory=Accumulator)  # tentative until the task ends
    hypers: StepHypers | None = None  # what the latest step used (recorded with its point)
    step_hypers: list[StepHypers] = field(default_factory=list)  # per step k (shared objects; for θ0 learners)
    guard: step_check.GradGuard | None = None  # set while a checked task adapts (its gradients' versions)
    check: step_check.Before | None = None  # the first step, compared where the loop took θ_1 to
    # issue 18: the loop seen from the optimizer (warpopt/loop.py) and the loop's training loss
    # L(θ_k) of the step being taken, for θ0 learners that ask for them (``unrolls``/``needs_loss``)
    loop: Loop | None = None
    loss: torch.Tensor | None = None

    def recorded(self, k: int) -> list[torch.Tensor] | None:
        """θ_k as recorded (read-only views; issue 18), or None: not recorded at every step exactly."""
        return self.trajectory.params_at(k) if self.trajectory is not None and self.trajectory.every == 1 else None

    def sample(self, states: list[dict[str, torch.Tensor]]) -> Sample:
        """The live θ_k as a replay sample (for the online algorithms)."""
        return Sample(
            self.task,
            -1,
            self.steps,
            [p.detach() for p in self.params],
            list(states),
            [b.detach() for b in self.buffers],
            hypers=self.hypers,
        )


@dataclass
class TaskOutcome:
    """What a cleanly finished task hands to the meta-optimizer to commit."""

    trajectory: Trajectory | None
    steps: int
    algorithm_state: Accumulator
    contribution: list[torch.Tensor] | None


def begin(
    model: Model,
    task: Task,
    *,
    reset: bool,
    learn: bool,
    algorithm: Algorithm,
    initialisation: InitialisationLearner,
    replay: ReplayBuffer,
    algorithm_state: Accumulator,
    objective: Objective | None = None,
) -> TaskRun:
    """Start a task: θ ← θ0 (if ``reset``), φ frozen (unless harvested), recording on."""
    buffers = model.live_buffers()
    with torch.no_grad():
        # What a failed task restores: the state before this task touched anything.
        restore = (
            [p.detach().clone() for p in model.adapt],
            [b.detach().clone() for b in buffers],
            copy_state_dict(model.task_optimizer.state_dict()),
        )
        if reset:
            for p, t0 in zip(model.adapt, model.theta0):
                p.copy_(t0)
            for b, b0 in zip(buffers, model.initial_buffers):
                b.copy_(b0)
            model.task_optimizer.state.clear()
            for group in model.task_optimizer.param_groups:
                for key, value in model.learned.items():
                    group[key] = float(value)
        # θ_0 of this task: θ0 after a reset, the carried-over θ in continual learning.
        start = [p.detach().clone() for p in model.adapt]
        start_buffers = [b.detach().clone() for b in buffers]
    records = learn and algorithm.records and bool(model.meta_parameters())
    run = TaskRun(
        task,
        model.context(),
        model.adapt,
        buffers,
        start,
        start_buffers,
        learn,
        restore,
        [p.requires_grad for p in model.warp],
        torch.ones((), dtype=torch.bool, device=model.adapt[0].device),
        algorithm_state=algorithm_state,
    )
    task.start_loop()
    model.clip = None
    try:
        if records:
            run.trajectory = replay.trajectory(task)
            run.trajectory.record(0, model.adapt, model.states(), buffers)

            def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                run.trajectory.record(run.steps + 1, model.adapt, model.states(), run.buffers)  # type: ignore[union-attr]

            run.hook = model.task_optimizer.register_step_post_hook(record)
        if not (learn and algorithm.harvests):
            for p in model.warp:
                p.requires_grad_(False)  # frozen while the task adapts: no φ work in its backward
        # Issue 14: sampled tasks check that their first step is the one the replay would take.
        # (Not when the θ0 learner unrolls the loop: warpopt/loop.py writes .grad itself and checks the loss.)
        if (
            learn
            and model.meta_parameters()
            and not algorithm.harvests
            and not initialisation.unrolls
            and step_check.due(model.tasks_begun)
        ):
            run.guard = step_check.GradGuard(model.adapt)
        model.tasks_begun += 1
        # ---- issue 18: the loop seen from the optimizer (warpopt/loop.py) ----------------------
        # MAML builds its differentiable trajectory in the loop; Warp-MAML (online, exact, no learned
        # hyper-parameters) also reads its per-step warp meta-gradient off it; Leap's training loss
        # is read off the loop's forwards.
        if learn and (initialisation.unrolls or initialisation.needs_loss):
            warp_term = (
                initialisation.unrolls
                and objective is not None
                and not algorithm.harvests
                and algorithm.step_objective(objective) is exact
                and bool(model.warp)
                and not model.learned
            )
            run.loop = Loop(
                model.module,
                task,
                model.adapt_names,
                model.adapt,
                model.buffer_names,
                buffers,
                start,
                model.warp,
                unroll=initialisation.unrolls,
                warp_term=warp_term,
            )
        # ---- end issue 18 ------------------------------------------------------------------------
        if learn:
            run.init_state = initialisation.begin_task(run)
    except BaseException:  # e.g. a probe's draw from empty data: nothing of this task may outlive it
        finish(model, run)
        abort(model, run)
        raise
    return run


def step(
    model: Model,
    run: TaskRun | None,
    *,
    algorithm: Algorithm,
    initialisation: InitialisationLearner,
    objective: Objective,
    algorithm_state: Accumulator,
    loss: torch.Tensor | None = None,
) -> tuple[Accumulator, list[torch.Tensor] | None]:
    """One task update of θ, recorded; returns the algorithm's new state (``run``'s tentative
    one inside a task) and a warp gradient that is due now (continual), if any. ``run`` is
    None for continual steps outside a task. ``loss``: what ``step(closure)`` returned."""
    if run is not None:
        algorithm_state = run.algorithm_state
        live, start = model.adapt[0], run.theta0[0]  # model.to() moves all: one check per step
        if live.dtype != start.dtype or live.device != start.device:
            raise RuntimeError(MOVED_IN_TASK)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.adapt]
    learn = run is None or run.learn
    clip, model.clip = model.clip, None
    if run is not None:  # issue 14: record what this step uses; check the step on sampled tasks
        _verify_first_step(model, run)  # θ_1 as the loop left it (after any change of its own)
        run.hypers = capture(model.task_optimizer, clip, run.hypers)
        run.step_hypers.append(run.hypers)
        if run.trajectory is not None:
            run.trajectory.note_hypers(run.steps, run.hypers)
        _check_loop_reads_task(model, run)  # each step: a draw (Leap's probe) may read ahead at any step
        if run.steps == 0:  # the replays of this task's steps run the model in the loop's modes
            run.task.training = module_modes(model.module)
        if run.steps == 0 and run.guard is not None:
            run.check = step_check.before(
                model.adapt, model.states(), grads, run.buffers, run.hypers, run.guard, run.task
            )
        elif run.guard is not None:  # later steps of a checked task: the free version-counter half
            changed = run.guard.changed()
            if changed:
                step_check.report(step_check.changed_gradients(changed, run.steps), model.reported, run.task)
                run.guard.remove()
                run.guard = None
    # ---- issue 18: the unrolled step θ_{k+1} = U(θ_k, g_k), a graph node of θ0 (MAML) ----------
    loop = run.loop if run is not None else None
    unrolled = None
    if loop is not None and loop.unroll:
        g_theta = loop.gradient(run.steps)  # type: ignore[union-attr]
        with torch.enable_grad():  # step() runs under no_grad (torch.optim): this update is differentiated
            # the step as taken: this step's hyper-parameters and clipping (issue 14)
            unrolled = run.context.apply_step(loop.theta, g_theta, loop.states, run.hypers)  # type: ignore[union-attr]
    # ---- end issue 18 --------------------------------------------------------------------------
    step_grads = earlier = None  # earlier: the previous step's pending Eq. 7 term (Warp-MAML)
    meta_params = model.meta_parameters()  # built once per step (a new list on every call)
    if learn and meta_params:  # θ0-only meta-learning has no per-step φ work
        if algorithm.harvests:
            step_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in meta_params]
            for p in meta_params:
                p.grad = None
        else:
            step_objective = algorithm.step_objective(objective)
            if step_objective is not None:
                if run is None:
                    raise RuntimeError(f"{algorithm!r} needs the task's data: step inside `with opt.task(...)`")
                sample, fast = run.sample, False
                if unrolled is not None and loop.warp:  # type: ignore[union-attr]
                    # issue 18: Warp-MAML's Eq. 7 term read off the unrolled step (no second inner step):
                    # the previous step's term is due now, this step's waits (see Loop.warp_loss); when
                    # the objective's inner step is not the loop's, it is replayed as below
                    earlier = loop.warp_gradient()  # type: ignore[union-attr]
                    drawn = loop.warp_loss(run.steps, unrolled[0])  # type: ignore[union-attr]
                    fast = drawn is None
                    if drawn is None:
                        step_grads, earlier = earlier, None
                    else:
                        task_batch, meta_batch = drawn

                        def sample(states: Any) -> Sample:
                            return replace(run.sample(states), task_batch=task_batch, meta_batch=meta_batch)

                if not fast:
                    with torch.enable_grad():
                        step_grads, _ = meta_gradient(
                            step_objective, run.context, [sample(model.states())], meta_params
                        )
    if loop is not None and initialisation.needs_loss:  # issue 18: the loop's training loss L(θ_k)
        run.loss = loss.detach() if loss is not None else loop.loss(run.steps, model.adapt)  # type: ignore[union-attr]
    previous = None
    if run is not None and learn and initialisation.needs_previous:  # θ_k: recorded already, else a copy
        previous = run.recorded(run.steps) or [p.detach().clone() for p in model.adapt]
    model.task_optimizer.step()
    due = None
    if run is not None:
        if learn:
            run.init_state = initialisation.after_step(run.init_state, run, previous, grads)
        if loop is not None:  # issue 18
            loop.advance(*(unrolled or ((), ())))
        run.steps += 1
    if learn and earlier is not None:  # counted before this step's replayed term (both are terms)
        # (no update is due from it: maml() with an algorithm updating φ inside the task is refused)
        algorithm_state, due = algorithm.on_step(algorithm_state, earlier)
    if learn and step_grads is not None:
        algorithm_state, due = algorithm.on_step(algorithm_state, step_grads)
        if run is not None:
            run.algorithm_state = algorithm_state
    return algorithm_state, due


def finish(model: Model, run: TaskRun) -> None:
    """Stop recording and unfreeze φ (both on success and failure)."""
    if run.hook is not None:
        run.hook.remove()
        run.hook = None
    if run.guard is not None:
        run.guard.remove()
        run.guard = None
    if run.loop is not None:  # issue 18: the model's hooks come off with the task
        run.loop.remove()
    for p, flag in zip(model.warp, run.requires_grad):
        p.requires_grad_(flag)


def abort(model: Model, run: TaskRun) -> None:
    """Put θ, the adapt buffers and the task optimizer's state back to before ``begin``."""
    params, buffers, optimizer_state = run.restore
    run.loop = None  # issue 18: drop the unrolled graph now
    if run.trajectory is not None:  # issue 18: its recorded vectors go back to the buffer's arena
        run.trajectory.discard()
    with torch.no_grad():
        for p, s in zip(model.adapt, params):
            p.copy_(s)
        for b, s in zip(run.buffers, buffers):
            b.copy_(s)
    model.task_optimizer.load_state_dict(optimizer_state)


def end(
    model: Model,
    run: TaskRun,
    initialisation: InitialisationLearner,
    on_nonfinite: str,
    algorithm: Algorithm | None = None,
) -> TaskOutcome | None:
    """The task's outcome; None if a task gradient became NaN/inf: then θ is restored and the
    task dropped with a warning (``on_nonfinite="skip"``) or a ``FloatingPointError``."""
    finish(model, run)
    # issue 18: a NaN/inf gradient entry leaves θ non-finite from its step on: θ_K is checked, once
    run.finite &= torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in model.adapt])).sum())
    if bool(run.finite):
        _verify_first_step(model, run)
    if run.trajectory is not None:  # θ_K is replayed with what the next step would use
        run.trajectory.note_hypers(run.steps, capture(model.task_optimizer, None, run.hypers))
    if not bool(run.finite):  # the one host synchronisation per task
        abort(model, run)
        message = (
            f"a task gradient became NaN/inf while adapting {run.task!r}; its trajectory was "
            "dropped and the parameters restored"
        )
        if on_nonfinite == "raise":
            raise FloatingPointError(message + " (pass on_nonfinite='skip' to skip such tasks)")
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        return None
    if not run.learn:
        return TaskOutcome(None, run.steps, run.algorithm_state, None)
    _check_loop_reads_task(model, run)
    if run.trajectory is not None and not run.task.can_draw():  # meta_step() would fail on it, every time
        fix = (
            "your loop read the one-shot data (a generator or iterator) itself, so no batch is left for "
            "the replay's draws at meta_step(). Iterate the task instead: `with opt.task(gen, loss_fn) as "
            "task: for x, y in task: ...` (its batches are kept for the replay), or pass a list of batches "
            "or a callable k -> batch"
            if run.task.kind == "one-shot"
            else "the task's data is empty (a DataLoader with drop_last=True yields no batch from fewer "
            "samples than batch_size), so the replay would have no batch at meta_step()"
        )
        raise ValueError(f"{run.task!r}: {fix}. The task was rolled back; nothing was recorded")
    if run.loop is not None:  # issue 18: the loop's loss was the task's at every step (else ValueError)
        run.loop.check()
    contribution = initialisation.end_task(run.init_state, run)
    if contribution is not None:
        contribution = [c.detach() for c in contribution]
    if run.loop is not None and algorithm is not None:  # issue 18: the last step's pending Eq. 7 term
        last = run.loop.warp_gradient()
        if last is not None:
            run.algorithm_state, _ = algorithm.on_step(run.algorithm_state, last)
    return TaskOutcome(run.trajectory, run.steps, run.algorithm_state, contribution)


def clip_grad_norm_(
    model: Model, run: TaskRun | None, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` on the adapt parameters, recorded for the next step so
    that the replay clips the same way, differentiably (``warpopt.clipping``). Returns the total
    norm of the gradients before clipping."""
    max_norm, norm_type = check_max_norm(max_norm, norm_type)
    if model.clip is not None and model.clip[1] != norm_type:
        raise ValueError(
            f"clip_grad_norm_ was already called for this step with norm_type={model.clip[1]}: clip once per step"
        )
    total = torch.nn.utils.clip_grad_norm_(model.adapt, max_norm, norm_type, error_if_nonfinite)
    # Clipping twice by the same norm is clipping once by the smaller bound.
    model.clip = (max_norm if model.clip is None else min(max_norm, model.clip[0]), norm_type)
    if run is not None and run.guard is not None:
        run.guard.refresh()  # our own, recorded change to the gradients
    return total


def _verify_first_step(model: Model, run: TaskRun) -> None:
    """Compare the checked first step with the θ_1 the loop went on from (``warpopt.step_check``)."""
    if run.check is not None:
        check, run.check = run.check, None
        try:
            found = step_check.after(run.context, run.task, model.adapt, check)
        except Exception as error:  # a diagnostic must never stop the user's training
            found = ("unchecked", f"{type(error).__name__}: {error}")
        step_check.report(found, model.reported, run.task)


def _check_loop_reads_task(model: Model, run: TaskRun) -> None:
    """At each step and the task's end: batches a draw read ahead from a one-shot iterator are
    lost to a loop that iterates the iterator itself rather than the task (warned once)."""
    if "data" in model.reported:
        return
    ahead = run.task.read_ahead()
    if ahead and not run.task.batches_seen():
        model.reported.add("data")
        warnings.warn(
            f"{run.task!r}: {ahead} batch(es) of your one-shot data (a generator or iterator) were read by "
            "warpopt (Leap's probe or a replay draw) and your loop does not iterate the task, so it will "
            "not see them. Iterate the task instead: `with opt.task(gen, "
            "loss_fn) as task: for x, y in task: ...` (every batch reaches the loop and is kept for the "
            "replay). Reported once.",
            RuntimeWarning,
            stacklevel=4,
        )
