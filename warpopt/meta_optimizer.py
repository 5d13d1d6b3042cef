"""``WarpGradMetaOptimizer``: a torch.optim optimizer that adapts tasks and meta-learns warps.

    model = warpopt.warp(net)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-3)
    for loader in tasks:
        with opt.task(loader, loss_fn):          # θ ← θ0, start recording
            for x, y in loader:
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    opt.meta_step()                              # φ (and θ0) update: J = L(φ) + λC(θ0), Eq. 9

Task steps are taken by a real torch optimizer (``task_optimizer``, SGD by default) over the
adapt parameters; its ``param_groups`` and ``state`` *are* this optimizer's, so schedulers and
hooks work as with any torch optimizer. Each step is recorded by a step hook on that
optimizer. The warp update follows ``algorithm`` (Algorithm 1/2/3) with ``objective`` (Eq. 7
exact / Eq. 8 approx), the θ0 update follows ``initialisation`` (Leap, MAML, Reptile, ...).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import warping
from .algorithms import Algorithm, Offline
from .initialisation import InitialisationLearner, Leap, NoInitialisation
from .objectives import Objective, ReplayContext, approx, exact
from .task_optimizers import functional_step_for, optimizer_states
from .tasks import Task
from .trajectory import ReplayBuffer, TaskRun

__all__ = ["WarpGradMetaOptimizer"]


class WarpGradMetaOptimizer(torch.optim.Optimizer):
    """WarpGrad meta-optimizer (Algorithms 1-3, Eq. 7-9).

    Args:
        model: a model prepared with ``warpopt.warp``.
        lr: task learning rate α (and any other ``task_kwargs`` of the task optimizer).
        params: optional param groups over a subset of the adapt parameters (default: all).
        task_optimizer: torch optimizer class (or factory ``(params, **kwargs)``) for task steps.
        meta_lr: β, learning rate of the warp update.
        meta_optimizer: optimizer class/factory for φ, θ0 and learned hyper-parameters (Adam).
        objective: ``warpopt.exact`` (Eq. 7, default) or ``warpopt.approx`` (Eq. 8) or your own.
        algorithm: ``warpopt.offline()`` (default), ``online()`` or ``continual(every=η)``.
        initialisation: θ0 meta-learner: ``warpopt.leap()`` (default), ``maml()``,
            ``fomaml()``, ``reptile()``, ``multitask()`` or ``none()``.
        init_lr: λβ, learning rate of θ0 (default ``meta_lr``).
        replay: the ``ReplayBuffer`` for the offline algorithm.
        learn_lr / learn_momentum: meta-learn one scalar task lr / momentum ("learned α").
        learned_clip: clip value for the learned hyper-parameters' meta-gradients.
        on_nonfinite: "raise" (default) or "skip" (warn and drop the task) when a task
            gradient becomes NaN/inf.
        reduce: applied to every meta-gradient (φ and θ0) before it is used, e.g. an
            all-reduce mean across processes (``warpopt.distributed``); identity by default.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        *,
        params: Optional[Iterable[Any]] = None,
        task_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        meta_lr: float = 1e-3,
        meta_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        objective: Objective = exact,
        algorithm: Optional[Algorithm] = None,
        initialisation: Optional[InitialisationLearner] = None,
        init_lr: Optional[float] = None,
        replay: Optional[ReplayBuffer] = None,
        learn_lr: bool = False,
        learn_momentum: bool = False,
        learned_lr: float = 1e-3,
        learned_clip: Optional[float] = 1e-3,
        on_nonfinite: str = "raise",
        reduce: Optional[Callable[[list[torch.Tensor]], list[torch.Tensor]]] = None,
        **task_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"WarpGradMetaOptimizer needs an nn.Module, got {type(model).__name__}")
        if not warping.is_warped(model):
            raise TypeError("the model is not warped: call `model = warpopt.warp(model)` first")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        algorithm = algorithm if algorithm is not None else Offline()
        initialisation = initialisation if initialisation is not None else Leap()
        if (learn_lr or learn_momentum) and objective is approx:
            raise ValueError("learn_lr/learn_momentum need objective=exact: Eq. 8 stops the gradient "
                             "through the task update, so α would get no meta-gradient")
        named_adapt = list(warping.named_adapt_parameters(model))
        warp_params = [p for _, p in warping.named_warp_parameters(model)]
        if not warp_params:
            raise ValueError("the warped model has no warp parameters to meta-learn")
        groups = self._task_groups(params, named_adapt)

        self.model = model
        inner = task_optimizer(groups, lr=lr, **task_kwargs)
        # Fail now, before any state exists, if the update rule cannot be replayed.
        self._step_fn = functional_step_for(inner)
        super().__init__(inner.param_groups, inner.defaults)
        self.task_optimizer = inner  # from here on, param_groups/state/defaults are the inner's

        ids = {id(p) for g in self.param_groups for p in g["params"]}
        names = {id(p): n for n, p in named_adapt}
        self._adapt = [p for _, p in named_adapt if id(p) in ids]
        self._adapt_names = [names[id(p)] for p in self._adapt]
        named_buffers = list(warping.named_adapt_buffers(model))
        self._buffer_names = [n for n, _ in named_buffers]
        self._warp = warp_params
        self.device = self._adapt[0].device

        self.objective = objective
        self.algorithm = algorithm
        self.initialisation = initialisation
        self.replay = replay if replay is not None else ReplayBuffer()
        self.on_nonfinite = on_nonfinite
        self.learned_clip = learned_clip
        self.reduce = reduce if reduce is not None else (lambda grads: grads)

        with torch.no_grad():
            self.theta0 = [nn.Parameter(p.detach().clone()) for p in self._adapt]
            self.initial_buffers = [b.detach().clone() for _, b in named_buffers]
        self.learned: dict[str, nn.Parameter] = {}
        if learn_lr:
            self.learned["lr"] = nn.Parameter(torch.tensor(float(self.param_groups[0]["lr"]), device=self.device))
        if learn_momentum:
            if "momentum" not in self.param_groups[0]:
                raise ValueError("learn_momentum needs a task optimizer with a 'momentum' hyper-parameter")
            self.learned["momentum"] = nn.Parameter(
                torch.tensor(float(self.param_groups[0]["momentum"]), device=self.device))
        meta_groups = [{"params": self._warp, "lr": meta_lr, "name": "warp"}]
        if not isinstance(initialisation, NoInitialisation):
            meta_groups.append({"params": self.theta0, "lr": meta_lr if init_lr is None else init_lr,
                                "name": "initialisation"})
        if self.learned:
            meta_groups.append({"params": list(self.learned.values()), "lr": learned_lr, "name": "learned"})
        self.meta_optimizer = meta_optimizer(meta_groups)

        self._run: Optional[TaskRun] = None
        self._init_sum: Optional[list[torch.Tensor]] = None
        self._init_count = 0
        self.counters = {"tasks": 0, "task_steps": 0, "meta_steps": 0, "warp_updates": 0}
        self._meta_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._meta_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()

    # The task optimizer's param_groups and state *are* this optimizer's (torch.optim contract:
    # schedulers and users edit param_groups); torch replaces both objects on load_state_dict,
    # so delegate rather than alias.
    def _delegate(name: str) -> property:  # type: ignore[misc]
        def get(self: "WarpGradMetaOptimizer") -> Any:
            inner = self.__dict__.get("task_optimizer")
            return getattr(inner, name) if inner is not None else self.__dict__["_own_" + name]

        def set(self: "WarpGradMetaOptimizer", value: Any) -> None:
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

    @staticmethod
    def _task_groups(params: Optional[Iterable[Any]], named_adapt: list) -> list[dict[str, Any]]:
        adapt_ids = {id(p) for _, p in named_adapt}
        if params is None:
            if not named_adapt:
                raise ValueError("the warped model has no adapt parameters to train on tasks")
            return [{"params": [p for _, p in named_adapt]}]
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            group_params = group["params"]
            group_params = [group_params] if isinstance(group_params, torch.Tensor) else list(group_params)
            for p in group_params:
                if id(p) not in adapt_ids:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} passed in params is not an adapt "
                        "parameter of the warped model; pass parameters from model.adapt_parameters()")
            group["params"] = group_params
        return groups

    # ------------------------------------------------------------------ replay plumbing
    def meta_parameters(self) -> list[torch.Tensor]:
        """The parameters the warp objective differentiates: φ and learned hyper-parameters."""
        return self._warp + list(self.learned.values())

    def current_states(self) -> list[dict[str, torch.Tensor]]:
        return optimizer_states(self.task_optimizer, self._adapt)

    def replay_context(self) -> ReplayContext:
        """Functional view of the model and the task update rule for replay (Eq. 7/8)."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        hypers = []
        for p in self._adapt:
            group = group_of[id(p)]
            hypers.append({**group, **self.learned} if self.learned else group)
        buffers = self._buffer_names
        return ReplayContext(self.model, self._adapt_names, buffers, self._step_fn, hypers)

    @contextlib.contextmanager
    def warp_trainable(self) -> Iterator[None]:
        """Temporarily let φ require gradients (they are frozen while tasks adapt)."""
        flags = [p.requires_grad for p in self._warp]
        for p in self._warp:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, flag in zip(self._warp, flags):
                p.requires_grad_(flag)

    def _live_buffers(self) -> list[torch.Tensor]:
        named = dict(warping.named_adapt_buffers(self.model))
        return [named[n] for n in self._buffer_names]

    # ------------------------------------------------------------------ tasks
    @contextlib.contextmanager
    def task(self, data: Any, loss_fn: Optional[Callable] = None, *, reset: Optional[bool] = None,
             learn: bool = True, **task_kwargs: Any) -> Iterator[Task]:
        """Adapt to one task: reset θ ← θ0, record its trajectory, commit it at the end.

        ``data`` is the task's data (an iterable of batches, a callable, or a ``Task``) from
        which the meta-objectives draw fresh batches; ``loss_fn`` its criterion (or pass
        ``batch_loss=``, ``meta_data=``, ``meta_loss=``; see ``warpopt.Task``). ``reset``
        overrides the algorithm's choice (continual learning keeps θ). ``learn=False``
        adapts without recording or meta-learning from the task (evaluation on held-out
        tasks). On an exception or a non-finite task gradient, parameters are restored and
        nothing is committed.
        """
        if self._run is not None:
            raise RuntimeError("tasks cannot be nested: finish the current `with opt.task(...)` block first")
        task = data if isinstance(data, Task) else Task(data, loss_fn, **task_kwargs)
        run = self._begin(task, self.algorithm.resets if reset is None else reset, learn)
        try:
            yield task
        except BaseException:
            self._finish(run)
            self._restore(run)
            raise
        self._end(run)

    def _begin(self, task: Task, reset: bool, learn: bool = True) -> TaskRun:
        buffers = self._live_buffers()
        with torch.no_grad():
            # What a failed task restores: the state before this task touched anything.
            restore = ([p.detach().clone() for p in self._adapt], [b.detach().clone() for b in buffers],
                       copy.deepcopy(self.task_optimizer.state_dict()))
            if reset:
                for p, t0 in zip(self._adapt, self.theta0):
                    p.copy_(t0)
                for b, b0 in zip(buffers, self.initial_buffers):
                    b.copy_(b0)
                self.task_optimizer.state.clear()
                if self.learned:
                    for group in self.param_groups:
                        for key, value in self.learned.items():
                            group[key] = float(value)
            # θ_0 of this task: θ0 after a reset, the carried-over θ in continual learning.
            start = [p.detach().clone() for p in self._adapt]
            start_buffers = [b.detach().clone() for b in buffers]
        run = TaskRun(task, self.replay_context(), self._adapt, buffers, start, start_buffers, learn=learn,
                      finite=torch.ones((), dtype=torch.bool, device=self.device))
        run.extras["restore"] = restore
        if learn and self.algorithm.records:
            run.trajectory = self.replay.trajectory(task)
            run.trajectory.record(0, self._adapt, self.current_states(), buffers)
            run.extras["hook"] = self.task_optimizer.register_step_post_hook(self._recorder(run))
        run.extras["requires_grad"] = [p.requires_grad for p in self._warp]
        if not (learn and self.algorithm.harvests):
            for p in self._warp:
                p.requires_grad_(False)  # frozen while the task adapts: no φ work in its backward
        if learn:
            self.initialisation.begin_task(run)
        self._run = run
        return run

    def _recorder(self, run: TaskRun) -> Callable:
        def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            assert run.trajectory is not None
            run.trajectory.record(run.steps + 1, self._adapt, self.current_states(), run.buffers)

        return record

    def _finish(self, run: TaskRun) -> None:
        self._run = None
        hook = run.extras.pop("hook", None)
        if hook is not None:
            hook.remove()
        for p, flag in zip(self._warp, run.extras["requires_grad"]):
            p.requires_grad_(flag)

    def _restore(self, run: TaskRun) -> None:
        params, buffers, optimizer_state = run.extras["restore"]
        with torch.no_grad():
            for p, s in zip(self._adapt, params):
                p.copy_(s)
            for b, s in zip(run.buffers, buffers):
                b.copy_(s)
        self.task_optimizer.load_state_dict(optimizer_state)

    def _end(self, run: TaskRun) -> None:
        self._finish(run)
        if not bool(run.finite):  # the one host synchronisation per task
            self._restore(run)
            message = (f"a task gradient became NaN/inf while adapting {run.task!r}; its trajectory was "
                       "dropped and the parameters restored")
            if self.on_nonfinite == "skip":
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                return
            raise FloatingPointError(message + " (pass on_nonfinite='skip' to skip such tasks)")
        if run.trajectory is not None and not self.replay.include_final and run.trajectory.points:
            if run.trajectory.points[-1].step == run.steps and run.steps > 0:
                run.trajectory.points.pop()
        if not run.learn:
            return
        contribution = self.initialisation.end_task(run)
        self.algorithm.end_task(self, run)
        if contribution is not None:
            if self._init_sum is None:
                self._init_sum = [c.detach().clone() for c in contribution]
            else:
                torch._foreach_add_(self._init_sum, [c.detach() for c in contribution])
            self._init_count += 1
        self.counters["tasks"] += 1

    # ------------------------------------------------------------------ task step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One task update of the adapt parameters, recorded (the user's inner-loop step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        run = self._run
        if run is None and self.algorithm.resets:
            raise RuntimeError("step() outside a task: wrap the task loop in `with opt.task(data, loss_fn):`")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._adapt]
        if run is not None:
            norms = torch._foreach_norm(grads)
            run.finite &= torch.isfinite(torch.stack(norms).sum())
        learn = run is None or run.learn
        if learn:
            with torch.enable_grad():
                self.algorithm.before_update(self, run)
        previous = ([p.detach().clone() for p in self._adapt]
                    if run is not None and learn and self.initialisation.needs_previous else None)
        self.task_optimizer.step()
        if run is not None:
            if previous is not None:
                self.initialisation.after_step(run, previous, grads)
            run.steps += 1
        self.counters["task_steps"] += 1
        if learn:
            self.algorithm.after_update(self, run)
        return loss

    # ------------------------------------------------------------------ meta step
    def apply_warp_gradients(self, grads: list[torch.Tensor]) -> None:
        """φ ← meta-optimizer step with gradient ``grads`` (aligned with ``meta_parameters()``)."""
        params = self.meta_parameters()
        grads = self.reduce(list(grads))
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()) if grads else True
        if not bool(finite):
            raise FloatingPointError("the warp meta-gradient is NaN/inf: check the task and meta losses")
        for p in self.theta0:
            p.grad = None
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        if self.learned and self.learned_clip is not None:
            for p in self.learned.values():
                p.grad.clamp_(-self.learned_clip, self.learned_clip)
        self.meta_optimizer.step()
        for p in params:
            p.grad = None
        self.counters["warp_updates"] += 1

    def _apply_init_gradients(self) -> None:
        if self._init_sum is None:
            return
        for p in self.meta_parameters():
            p.grad = None
        for p, g in zip(self.theta0, self.reduce([g / self._init_count for g in self._init_sum])):
            p.grad = g
        self.meta_optimizer.step()
        for p in self.theta0:
            p.grad = None
        self._init_sum, self._init_count = None, 0

    def meta_step(self) -> dict[str, Any]:
        """The meta update: warp parameters (per ``algorithm``) then θ0 (Eq. 9).

        On any error, φ, θ0, the meta-optimizer and the replay buffer are left as they were.
        """
        if self._run is not None:
            raise RuntimeError("meta_step() inside a task: call it after the `with opt.task(...)` blocks")
        if not len(self.replay) and not self.algorithm.pending() and self._init_sum is None:
            raise RuntimeError("nothing to meta-learn from: the replay buffer is empty. Adapt at least one "
                               "task inside `with opt.task(data, loss_fn): ...` before meta_step()")
        for hook in list(self._meta_step_pre_hooks.values()):
            hook(self)
        snapshot = self._snapshot()
        try:
            stats = self.algorithm.meta_step(self)
            self._apply_init_gradients()
        except BaseException:
            self._load_snapshot(snapshot)
            raise
        self.counters["meta_steps"] += 1
        stats = {**stats, "counters": dict(self.counters)}  # per-step figures stay unshadowed
        for hook in list(self._meta_step_post_hooks.values()):
            hook(self, stats)
        return stats

    def _snapshot(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.meta_parameters() + self.theta0],
                "meta": copy.deepcopy(self.meta_optimizer.state_dict()),
                "algorithm": copy.deepcopy(self.algorithm.state_dict()),
                "init": (self._init_sum, self._init_count), "counters": dict(self.counters)}

    def _load_snapshot(self, snap: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, s in zip(self.meta_parameters() + self.theta0, snap["params"]):
                p.copy_(s)
                p.grad = None
        self.meta_optimizer.load_state_dict(snap["meta"])
        self.algorithm.load_state_dict(snap["algorithm"])
        self._init_sum, self._init_count = snap["init"]
        self.counters = snap["counters"]

    def register_meta_step_pre_hook(self, hook: Callable[["WarpGradMetaOptimizer"], None]) -> RemovableHandle:
        """``hook(optimizer)`` before each ``meta_step``."""
        handle = RemovableHandle(self._meta_step_pre_hooks)
        self._meta_step_pre_hooks[handle.id] = hook
        return handle

    def register_meta_step_post_hook(self, hook: Callable[["WarpGradMetaOptimizer", dict], None]) -> RemovableHandle:
        """``hook(optimizer, stats)`` after each ``meta_step``."""
        handle = RemovableHandle(self._meta_step_post_hooks)
        self._meta_step_post_hooks[handle.id] = hook
        return handle

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume meta-training bit-identically (between meta-steps)."""
        if self._run is not None or len(self.replay):
            raise RuntimeError("state_dict() mid meta-batch: the replay buffer holds task data sources "
                               "that cannot be saved; call it after meta_step()")
        return {
            "task": self.task_optimizer.state_dict(),
            "meta": self.meta_optimizer.state_dict(),
            "theta0": [t.detach().clone() for t in self.theta0],
            "initial_buffers": [b.clone() for b in self.initial_buffers],
            "warp": [p.detach().clone() for p in self._warp],
            "learned": {k: v.detach().clone() for k, v in self.learned.items()},
            "algorithm": copy.deepcopy(self.algorithm.state_dict()),
            "init": (self._init_sum, self._init_count),
            "replay": self.replay.state_dict(),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; shapes are checked before anything changes."""
        expected = {"task", "meta", "theta0", "initial_buffers", "warp", "learned", "algorithm", "init",
                    "replay", "counters"}
        missing = expected - set(state_dict)
        if missing:
            raise ValueError(f"not a WarpGradMetaOptimizer state_dict: missing {sorted(missing)}")
        for what, saved, live in (("theta0", state_dict["theta0"], self.theta0),
                                  ("warp", state_dict["warp"], self._warp),
                                  ("initial_buffers", state_dict["initial_buffers"], self.initial_buffers)):
            if len(saved) != len(live) or any(s.shape != t.shape for s, t in zip(saved, live)):
                raise ValueError(f"state_dict {what!r} does not match this model's shapes")
        if set(state_dict["learned"]) != set(self.learned):
            raise ValueError(f"state_dict learns {sorted(state_dict['learned'])}, this optimizer {sorted(self.learned)}")
        with torch.no_grad():
            for dst, src in zip(self.theta0 + self._warp + self.initial_buffers,
                                state_dict["theta0"] + state_dict["warp"] + state_dict["initial_buffers"]):
                dst.copy_(src)
            for k, v in state_dict["learned"].items():
                self.learned[k].copy_(v)
        self.task_optimizer.load_state_dict(state_dict["task"])
        self.meta_optimizer.load_state_dict(state_dict["meta"])
        self.algorithm.load_state_dict(copy.deepcopy(state_dict["algorithm"]))
        self._init_sum, self._init_count = state_dict["init"]
        self.replay.load_state_dict(state_dict["replay"])
        self.counters = dict(state_dict["counters"])
