"""``WarpGradMetaOptimizer``: a torch.optim optimizer that adapts tasks and meta-learns warps.

    model = warpopt.warp(net)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-3)
    for loader in tasks:
        with opt.task(loader, loss_fn) as task:  # θ ← θ0, start recording
            for x, y in task:                    # (or `in loader`: see Task.loop_batch)
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    opt.meta_step()                              # φ (and θ0) update: J = L(φ) + λC(θ0), Eq. 9

A thin shell: task steps are taken by a real torch optimizer (``task_optimizer``, SGD by
default) whose ``param_groups`` and ``state`` *are* this optimizer's, so schedulers and hooks
work as with any torch optimizer; the task session (``warpopt.session``) resets, freezes φ and
records; the meta update (``warpopt.meta_update``) replays, reduces and applies; algorithms
and θ0 learners are pure functions of explicit state held here.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import checkpoint, placement, session, task_checkpoint
from .algorithms import Algorithm, Offline
from .initialisation import InitialisationLearner, Leap
from .meta_update import Contributions, MetaParameters, add_contribution, check_rate, meta_update, transaction
from .objectives import Objective, ReplayContext, approx, exact, trainable
from .tasks import Task
from .trajectory import ReplayBuffer

__all__ = ["WarpGradMetaOptimizer"]


class WarpGradMetaOptimizer(torch.optim.Optimizer):
    """WarpGrad meta-optimizer (Algorithms 1-3, Eq. 7-9).

    Args:
        model: a model prepared with ``warpopt.warp`` (or any module: θ0-only meta-learning).
        lr: task learning rate α (and any other ``task_kwargs`` of the task optimizer).
        params: optional param groups over a subset of the adapt parameters (default: all).
        task_optimizer: torch optimizer class (or factory ``(params, **kwargs)``) for task steps.
        meta_lr: β, learning rate of the warp update.
        meta_optimizer: optimizer class/factory for φ and learned hyper-parameters, and
            (a separate instance) for θ0 (Adam).
        objective: ``warpopt.exact`` (Eq. 7, default) or ``warpopt.approx`` (Eq. 8) or your own.
        algorithm: ``warpopt.offline()`` (default), ``online()`` or ``continual(every=η)``.
        initialisation: θ0 meta-learner: ``warpopt.leap()`` (default), ``maml()``,
            ``fomaml()``, ``reptile()``, ``multitask()`` or ``none()``.
        init_lr: λβ, learning rate of θ0 (default ``meta_lr``).
        replay: the ``ReplayBuffer`` for the offline algorithm.
        learn_lr / learn_momentum: meta-learn one scalar task lr / momentum ("learned α").
        learned_clip: clip value for the learned hyper-parameters' meta-gradients.
        on_nonfinite: "raise" (default) or "skip" (warn and drop the task or the update) when
            a task gradient or a meta-gradient becomes NaN/inf.
        reduce: applied to every meta-gradient (φ and θ0) before it is used, e.g. an
            all-reduce mean across processes (``warpopt.distributed``); identity by default.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        *,
        params: Iterable[Any] | None = None,
        task_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        meta_lr: float = 1e-3,
        meta_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        objective: Objective = exact,
        algorithm: Algorithm | None = None,
        initialisation: InitialisationLearner | None = None,
        init_lr: float | None = None,
        replay: ReplayBuffer | None = None,
        learn_lr: bool = False,
        learn_momentum: bool = False,
        learned_lr: float = 1e-3,
        learned_clip: float | None = 1e-3,
        on_nonfinite: str = "raise",
        reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
        **task_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"WarpGradMetaOptimizer needs an nn.Module, got {type(model).__name__}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        for name, value in (
            ("lr", lr),
            ("meta_lr", meta_lr),
            ("init_lr", meta_lr if init_lr is None else init_lr),
            ("learned_lr", learned_lr),
        ):
            check_rate(name, value)
        algorithm = algorithm if algorithm is not None else Offline()
        initialisation = initialisation if initialisation is not None else Leap()
        if (learn_lr or learn_momentum) and objective is approx:
            raise ValueError(
                "learn_lr/learn_momentum need objective=exact: Eq. 8 stops the gradient "
                "through the task update, so α would get no meta-gradient"
            )
        self.core = session.build(model, params, task_optimizer, lr, task_kwargs, learn_lr, learn_momentum)
        if initialisation.unrolls and not algorithm.resets and self.core.warp:
            raise ValueError(
                "continual() updates φ inside step() while maml()'s in-loop trajectory holds φ in its graph "
                'of the task: use warpopt.maml(unroll="replay") with continual()'
            )
        if not self.core.meta_parameters() and not initialisation.learns:
            raise ValueError(
                "nothing to meta-learn: the model has no warp parameters (call "
                "`warpopt.warp(model)`) and initialisation=none() keeps θ0 fixed"
            )
        super().__init__(self.core.task_optimizer.param_groups, self.core.task_optimizer.defaults)
        self.task_optimizer = self.core.task_optimizer  # from here on, param_groups/state/defaults are the inner's
        self.model = model
        self.meta = MetaParameters.build(
            self.core,
            meta_optimizer,
            meta_lr,
            meta_lr if init_lr is None else init_lr,
            learned_lr,
            initialisation.learns,
            reduce,
            on_nonfinite,
            learned_clip,
        )
        self.objective, self.algorithm, self.initialisation = objective, algorithm, initialisation
        self.replay = replay if replay is not None else ReplayBuffer()
        self.on_nonfinite = on_nonfinite
        self.algorithm_state = algorithm.init()
        self.contributions = Contributions()
        self.counters = {"tasks": 0, "task_steps": 0, "meta_steps": 0, "warp_updates": 0}
        self._run: session.TaskRun | None = None
        self._resumed: dict[str, Any] | None = None  # a task interrupted by a checkpoint, loaded, not yet continued
        self._meta_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._meta_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()

    # The task optimizer's param_groups and state *are* this optimizer's (torch.optim contract);
    # torch replaces both objects on load_state_dict, so delegate rather than alias.
    def _delegate(name: str) -> property:  # type: ignore[misc]
        def get(self: WarpGradMetaOptimizer) -> Any:
            inner = self.__dict__.get("task_optimizer")
            return getattr(inner, name) if inner is not None else self.__dict__["_own_" + name]

        def set(self: WarpGradMetaOptimizer, value: Any) -> None:
            inner = self.__dict__.get("task_optimizer")
            if inner is not None:
                setattr(inner, name, value)
            else:
                self.__dict__["_own_" + name] = value

        return property(get, set)

    param_groups = _delegate("param_groups")
    state = _delegate("state")
    defaults = _delegate("defaults")
    del _delegate

    theta0 = property(lambda self: self.meta.theta0, doc="θ0, where tasks start (nn.Parameters).")
    learned = property(lambda self: self.meta.learned, doc="Meta-learned task hyper-parameters.")
    initial_buffers = property(lambda self: self.core.initial_buffers, doc="Adapt buffers where tasks start.")
    meta_optimizer = property(lambda self: self.meta.warp_optimizer, doc="φ's meta optimizer.")
    init_optimizer = property(lambda self: self.meta.init_optimizer, doc="θ0's meta optimizer.")
    device = property(lambda self: self.core.adapt[0].device, doc="Where the adapt parameters are now.")

    def _follow(self) -> None:
        """θ0, buffers, learned hypers and optimizer states follow a moved model (warpopt.placement)."""
        pending = bool(len(self.replay) or self.algorithm_state.count or self.contributions.total.count)
        placement.follow(self.core, self.meta, pending)

    def meta_parameters(self) -> list[nn.Parameter]:
        """The parameters the warp objective differentiates: φ and learned hyper-parameters."""
        return self.core.meta_parameters()

    def replay_context(self) -> ReplayContext:
        """Functional view of the model and the task update rule for replay (Eq. 7/8)."""
        return self.core.context()

    def warp_trainable(self) -> contextlib.AbstractContextManager:
        """Temporarily let φ require gradients (they are frozen while tasks adapt)."""
        return trainable(self.core.warp)

    # ------------------------------------------------------------------ tasks
    @contextlib.contextmanager
    def task(
        self,
        data: Any,
        loss_fn: Callable | None = None,
        *,
        reset: bool | None = None,
        learn: bool = True,
        **task_kwargs: Any,
    ) -> Iterator[Task]:
        """Adapt to one task: reset θ ← θ0, record its trajectory, commit it at the end.

        ``data`` is the task's data (an iterable of batches, a callable, or a ``Task``) from
        which the meta-objectives draw batches (iterate the yielded task, ``for x, y in task``,
        when it is a generator or iterator); ``loss_fn`` its criterion (or pass
        ``batch_loss=``, ``meta_data=``, ``meta_loss=``; see ``warpopt.Task``). ``reset``
        overrides the algorithm's choice (continual learning keeps θ). ``learn=False``
        adapts without recording or meta-learning from the task (evaluation on held-out
        tasks). On an exception or a non-finite task gradient, parameters are restored and
        nothing is committed.

        After ``load_state_dict`` of a checkpoint taken inside a task (``task_in_progress``), the
        next ``task()`` continues that task at step k = ``task.start_step`` (θ_k, the optimizer
        state, the points so far, the θ0 learner's state; ``reset`` is ignored). Pass its loss and
        the data *from step k on*: the same callable ``k -> batch`` (the loop calls it from k), the
        same re-iterable (``for batch in task`` skips the k batches already taken; a loop over the
        data itself must skip them), for a one-shot source an iterator of the batches after the
        ``task_in_progress["batches_read"]`` the task had read (or ``None``).
        """
        if self._run is not None:
            raise RuntimeError("tasks cannot be nested: finish the current `with opt.task(...)` block first")
        if data is None and self._resumed is None:
            raise TypeError("task data is None: pass an iterable of batches, a callable k -> batch or a Task")
        task = data if isinstance(data, Task) else Task(data, loss_fn, **task_kwargs)
        self._follow()
        if self._resumed is not None:  # continue the task a checkpoint interrupted (warpopt.task_checkpoint)
            run = task_checkpoint.resume(
                self.core,
                task,
                self._resumed,
                algorithm=self.algorithm,
                initialisation=self.initialisation,
                replay=self.replay,
                objective=self.objective,
                learn=learn,
            )
            self._resumed = None
        else:
            run = session.begin(
                self.core,
                task,
                reset=self.algorithm.resets if reset is None else reset,
                learn=learn,
                algorithm=self.algorithm,
                initialisation=self.initialisation,
                replay=self.replay,
                algorithm_state=self.algorithm_state,
                objective=self.objective,
            )
        self._run = run
        try:
            yield task
            outcome = session.end(self.core, run, self.initialisation, self.on_nonfinite, self.algorithm)
            if outcome is not None and learn:
                self._commit(outcome)
            elif outcome is not None:
                self.counters["task_steps"] += outcome.steps
        except BaseException:
            session.finish(self.core, run)
            session.abort(self.core, run)
            raise
        finally:
            self._run = None

    def _commit(self, outcome: session.TaskOutcome) -> None:
        """Keep a finished task: its points (all or none), its meta-gradients, its θ0 term."""
        keyed = isinstance(self.algorithm, Offline) and self.algorithm.theta0 == "mini_batch"
        task_id = self.replay.next_task_id() if keyed else None
        contributions = (
            self.contributions
            if outcome.contribution is None
            else add_contribution(self.contributions, outcome.contribution, task_id)
        )
        if outcome.trajectory is not None:  # the one step that can fail (storage): all or nothing
            self.replay.commit(outcome.trajectory, outcome.steps)
        self.algorithm_state, self.contributions = outcome.algorithm_state, contributions
        self.counters["tasks"] += 1
        self.counters["task_steps"] += outcome.steps

    # ------------------------------------------------------------------ task step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]  # torch stubs split this into overloads; same contract
        """One task update of the adapt parameters, recorded (the user's inner-loop step).

        ``closure`` (optional, as in torch.optim): re-evaluates the model and returns the loss;
        that loss is also the training loss Leap's ΔL uses (``warpopt.leap(loss="train")``)."""
        for group in self.param_groups:
            check_rate("lr", group["lr"])
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._run is None and self.algorithm.resets:
            raise RuntimeError("step() outside a task: wrap the task loop in `with opt.task(data, loss_fn):`")
        if self._run is None:
            self._check_no_task_in_progress("step()")
        state, due = session.step(
            self.core,
            self._run,
            algorithm=self.algorithm,
            initialisation=self.initialisation,
            objective=self.objective,
            algorithm_state=self.algorithm_state,
            loss=loss,
        )
        if self._run is None:  # continual steps outside a task count at once; a task's when it ends
            self.algorithm_state = state
            self.counters["task_steps"] += 1
        if due is not None and self.meta.apply_phi(due):
            self.counters["warp_updates"] += 1
        return loss

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the adapt parameters, recorded with the next
        ``step()`` so that the replay clips the same way (differentiably, Eq. 7)."""
        return session.clip_grad_norm_(self.core, self._run, max_norm, norm_type, error_if_nonfinite)

    # ------------------------------------------------------------------ meta step
    def meta_step(self) -> dict[str, Any]:
        """The meta update: warp parameters (per ``algorithm``) then θ0 (Eq. 9).

        All or nothing: on any error φ, θ0, both meta optimizers, the replay buffer, the
        replay and global torch RNGs and the counters are left as they were.
        """
        if self._run is not None:
            raise RuntimeError("meta_step() inside a task: call it after the `with opt.task(...)` blocks")
        self._check_no_task_in_progress("meta_step()")
        if (
            not len(self.replay)
            and not self.algorithm.pending(self.algorithm_state)
            and not self.contributions.total.count
        ):
            raise RuntimeError(
                "nothing to meta-learn from: the replay buffer is empty. Adapt at least one "
                "task inside `with opt.task(data, loss_fn): ...` before meta_step()"
            )
        self._follow()
        saved = (self.algorithm_state, self.contributions, dict(self.counters))
        with transaction(self.meta, self.replay, saved, self._restore):
            for hook in list(self._meta_step_pre_hooks.values()):
                hook(self)
            stats, self.algorithm_state = meta_update(
                self.meta,
                self.core,
                self.algorithm,
                self.algorithm_state,
                self.contributions,
                self.replay,
                self.objective,
                self.device,
            )
            self.contributions = Contributions()
            self.counters["warp_updates"] += stats["warp_updates"]
            self.counters["meta_steps"] += 1
            stats = {**stats, "counters": dict(self.counters)}  # per-step figures stay unshadowed
            for post in list(self._meta_step_post_hooks.values()):
                post(self, stats)
        self.replay.clear()  # committed: only now may the buffer's points go
        return stats

    def _restore(self, saved: tuple) -> None:
        self.algorithm_state, self.contributions, self.counters = saved

    @staticmethod
    def _register(hooks: OrderedDict, hook: Callable) -> RemovableHandle:
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def register_meta_step_pre_hook(self, hook: Callable[[WarpGradMetaOptimizer], None]) -> RemovableHandle:
        """``hook(optimizer)`` before each ``meta_step`` (inside it: a raising hook undoes it)."""
        return self._register(self._meta_step_pre_hooks, hook)

    def register_meta_step_post_hook(self, hook: Callable[[WarpGradMetaOptimizer, dict], None]) -> RemovableHandle:
        """``hook(optimizer, stats)`` after each ``meta_step`` (inside it: a raising hook undoes it)."""
        return self._register(self._meta_step_post_hooks, hook)

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self, include_rng: bool = False) -> dict[str, Any]:
        """A snapshot (never mutated by later training) of everything needed to resume
        meta-training bit-identically, between any two tasks or any two steps of a task: a
        meta-batch's pending points and tasks' batches included, and inside a task (call it
        right after ``step()``) the task in progress as ``"task_in_progress"`` (None between
        tasks; ``warpopt.checkpoint``, ``warpopt.task_checkpoint``); ``include_rng``: the global
        torch (and CUDA) RNG states too. Tensors and plain containers only: it goes through
        ``torch.save`` and loads with ``torch.load(weights_only=True)``."""
        self._follow()
        return checkpoint.state_dict(self, include_rng)

    def load_state_dict(self, state_dict: dict[str, Any], tasks: Any | None = None) -> None:
        """Restore a ``state_dict()``: the whole dict is validated against this optimizer's
        configuration first; on a mismatch a ``ValueError`` names the field and nothing changes.
        A dict saved mid meta-batch needs ``tasks``: a ``Task`` per pending task, in the order
        they were adapted, re-attaching what cannot be saved (losses, callables, re-iterables).
        A dict saved inside a task leaves that task pending (``task_in_progress``): the next
        ``task()`` continues it (see ``task``)."""
        self._follow()
        checkpoint.load_state_dict(self, state_dict, tasks)

    @property
    def task_in_progress(self) -> dict[str, Any] | None:
        """The task a loaded checkpoint interrupted, waiting for ``task()`` to continue it: its
        ``name``, ``steps`` taken, data ``kind`` and ``batches_read`` from a one-shot source
        (None for other kinds); None when there is none."""
        return None if self._resumed is None else task_checkpoint.info(self._resumed)

    def discard_task_in_progress(self) -> None:
        """Drop the interrupted task instead of continuing it, as an aborted task: θ, the adapt
        buffers and the task optimizer's state go back to before it began; nothing of it is kept."""
        if self._resumed is not None:
            task_checkpoint.discard(self.core, self._resumed)
            self._resumed = None

    def _check_no_task_in_progress(self, what: str) -> None:
        if self._resumed is not None:
            info = task_checkpoint.info(self._resumed)
            raise RuntimeError(
                f"{what} while the task a checkpoint interrupted is pending ({info['name']!r} after "
                f"{info['steps']} steps): continue it first with `with opt.task(data, loss_fn) as task:` (its "
                "data from step task.start_step on), or drop it with opt.discard_task_in_progress()"
            )
