"""Meta-learners of the initialisation θ0: the C(θ0) term of J = L(φ) + λ C(θ0) (Eq. 9).

Each learner turns one adapted task into a gradient contribution for θ0; the meta-optimizer
averages contributions over the tasks of a meta-batch and applies them with learning rate
λβ. A learner is configuration plus three functions of an explicit per-task state
(optax style; all optional to override):

- ``begin_task(view) -> state``: the task starts at θ0 (``view.params`` hold θ0).
- ``after_step(state, view, previous, grads) -> state``: called after every task step; θ_k =
  ``previous`` (read-only: the recorded point or a copy; None unless the learner sets
  ``needs_previous``), its task gradient ``grads``, θ_{k+1} = ``view.params`` (live), k =
  ``view.steps``; ``view.loss`` is the loop's training loss L(θ_k) on its batch when the learner
  sets ``needs_loss`` (else None).
- ``end_task(state, view) -> list[Tensor] | None``: ∇C(θ0) for this task (None: none).

``view`` is the task's read-only view (``TaskView``, below; the session's
``warpopt.session.TaskRun``): ``task``, ``context`` (a ``ReplayContext``), live
``params``/``buffers``, the start ``theta0``/``start_buffers``,
``steps``, ``loss``, ``recorded(k)`` (θ_k as the task's trajectory recorded it, read-only views,
or None) and ``loop`` (``warpopt.loop.Loop``: with ``unrolls`` set, the
differentiable trajectory θ0 → θ_k the task loop built). A learner keeps nothing between calls
except what it returns.
Subclass ``InitialisationLearner`` to plug in your own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from .objectives import ReplayContext
from .tasks import Task

__all__ = [
    "InitialisationLearner",
    "Leap",
    "LeapState",
    "Reptile",
    "FOMAML",
    "MAML",
    "MultiTask",
    "NoInitialisation",
    "TaskView",
    "leap",
    "reptile",
    "fomaml",
    "maml",
    "multitask",
    "none",
]

Tensors = list[torch.Tensor]


class TaskView(Protocol):
    """What a θ0 learner may read of a task while it adapts."""

    task: Task
    context: ReplayContext
    params: Sequence[torch.Tensor]
    buffers: list[torch.Tensor]
    theta0: list[torch.Tensor]
    start_buffers: list[torch.Tensor]
    steps: int
    loss: torch.Tensor | None
    loop: Any

    def recorded(self, k: int) -> list[torch.Tensor] | None: ...


class InitialisationLearner:
    """Base class: a fixed θ0 (no contribution); tasks start from θ0."""

    #: whether ``after_step`` needs θ_k before the step (the recorded point, read-only; a parameter
    #: copy per step where the task does not record θ_k in full precision)
    needs_previous: bool = False
    #: whether ``after_step`` needs the loop's training loss L(θ_k) (``view.loss``)
    needs_loss: bool = False
    #: whether the task loop builds the differentiable trajectory (``view.loop``; MAML)
    unrolls: bool = False
    #: whether θ0 is meta-learned at all
    learns: bool = True

    def begin_task(self, view: TaskView) -> Any:
        return None

    def after_step(
        self, state: Any, view: TaskView, previous: Sequence[torch.Tensor] | None, grads: Sequence[torch.Tensor]
    ) -> Any:
        return state

    def end_task(self, state: Any, view: TaskView) -> Tensors | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoInitialisation(InitialisationLearner):
    """θ0 is a fixed random initialisation, never meta-learned (λC(θ0) = 0; Appendix G, J)."""

    learns = False


LEAP_LOSSES = ("train", "probe")


class LeapState(NamedTuple):
    """Leap's per-task state (its tensors are task-local buffers, updated in place: no
    allocation per step): the running meta-gradient ``grad``; θ_k, where the next segment starts
    (``last``; None when the task's trajectory records θ_k: ``TaskView.recorded``); the probe
    batch; the loss at the start of the open segment; for the training loss, the open segment
    (θ_{k-1} → θ_k) waiting for L(θ_k): Δθ, |Δθ|², ∇L(θ_{k-1}) (``last_grad``: the loop's own
    gradient tensors when the loop hands out new ones at every step, as ``zero_grad()`` makes it
    do, else a copy in ``spare``), and the loop's gradient tensors of the previous step (``seen``)."""

    grad: Tensors
    last: Tensors | None
    delta: Tensors
    probe: Any = None
    loss: torch.Tensor | None = None
    last_grad: Tensors | None = None
    sq: torch.Tensor | None = None
    spare: Tensors | None = None
    seen: Tensors | None = None


class Leap(InitialisationLearner):
    """Leap (Flennerhag et al., 2019): shorten the trajectory's length in (θ, L) space (Eq. 10).

    With ϑ_k = (θ_k, L_task(θ_k)), Δθ_k = θ_k − θ_{k-1} and ΔL_k = L(θ_k) − L(θ_{k-1}), the
    first-order meta-gradient is Eq. 13:

        ∇C_Leap(θ0) ≈ − Σ_k (ΔL_k ∇L(θ_{k-1}) + Δθ_k) / ‖ϑ_k − ϑ_{k-1}‖₂.

    ∇L(θ_{k-1}) is the task gradient of the step the user took. Where L comes from:

    - ``loss="train"`` (default, as Leap's own implementation): L(θ_k) is the training loss the
      loop computed at step k on its batch (``warpopt.loop``: read off the loop's forward, or
      the loss ``opt.step(closure)`` returns; no extra forward when the loop's inputs are the
      task's batch). The segments run over k = 1..K−1: the loop never evaluates L(θ_K), so the
      last step's segment is left out (as in the original). ΔL_k mixes the change of L with the
      difference between consecutive batches. A task whose loop batches cannot be known (a
      loader the loop iterates by itself, no closure) uses the probe instead, decided at its
      first step.
    - ``loss="probe"``: L(θ_k) on one probe batch drawn at the start of the task (one forward
      per step), so that ΔL_k measures the change of one function; all K segments.

    Args:
        loss_term: include the loss coordinate of ϑ (Eq. 10); False gives the pure
            parameter-space path length (all K segments, no loss needed).
        loss: ``"train"`` or ``"probe"``, see above.
    """

    def __init__(self, loss_term: bool = True, loss: str = "train") -> None:
        if loss not in LEAP_LOSSES:
            raise ValueError(f"leap(loss=...) must be one of {LEAP_LOSSES}, got {loss!r}")
        self.loss_term, self.loss = loss_term, loss

    @property
    def needs_loss(self) -> bool:  # type: ignore[override]
        return self.loss_term and self.loss == "train"

    @staticmethod
    def _probe_loss(view: TaskView, probe: Any, params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        forward = view.context.forward_at(
            [p.detach() for p in (view.params if params is None else params)], view.buffers
        )
        with torch.no_grad():
            return view.task.task_loss(forward, probe).detach()

    def begin_task(self, view: TaskView) -> LeapState:
        with torch.no_grad():
            grad = [torch.zeros_like(p) for p in view.params]
            # θ_k is read off the recorded trajectory when there is one (no copy per step)
            last = None if view.recorded(0) is not None else [p.detach().clone() for p in view.params]
            delta = [torch.empty_like(p) for p in view.params]
        if not self.loss_term:
            return LeapState(grad, last, delta)
        if self.loss == "train":
            return LeapState(grad, last, delta, spare=[torch.empty_like(p) for p in view.params])
        probe = view.task.task_batch(0)
        return LeapState(grad, last, delta, probe, self._probe_loss(view, probe))

    @staticmethod
    def _start(state: LeapState, view: TaskView) -> Sequence[torch.Tensor]:
        """θ_k, where the segment that the step k → k+1 opens starts (k = ``view.steps``)."""
        start = state.last if state.last is not None else view.recorded(view.steps)
        if start is None:
            raise RuntimeError(f"leap(): θ_{view.steps} was neither recorded nor kept")
        return start

    @staticmethod
    def _advance(state: LeapState, view: TaskView) -> torch.Tensor:
        """Δθ = θ_{k+1} − θ_k into ``state.delta`` (θ_{k+1} into ``state.last`` when θ_k is not
        read off the recorded trajectory); returns |Δθ|²."""
        for d, p, q in zip(state.delta, view.params, Leap._start(state, view)):
            torch.sub(p.detach(), q, out=d)
        if state.last is not None:
            torch._foreach_copy_(state.last, [p.detach() for p in view.params])
        return torch.stack(torch._foreach_norm(state.delta)).pow(2).sum()

    @staticmethod
    def _segment(state: LeapState, grads: Sequence[torch.Tensor], sq: torch.Tensor, dloss: torch.Tensor | None) -> None:
        """grad −= (ΔL ∇L + Δθ) / ‖(Δθ, ΔL)‖ (Eq. 13), in place."""
        if dloss is not None:
            sq = sq + dloss.pow(2)
        inv = sq.sqrt().clamp_min(torch.finfo(sq.dtype).tiny).reciprocal()
        for a, d in zip(state.grad, state.delta):
            a.addcmul_(d, inv.to(a.dtype), value=-1)
        if dloss is not None:
            scale = dloss * inv
            for a, g in zip(state.grad, grads):
                a.addcmul_(g, scale.to(a.dtype), value=-1)

    def after_step(
        self, state: LeapState, view: TaskView, previous: Sequence[torch.Tensor] | None, grads: Sequence[torch.Tensor]
    ) -> LeapState:
        # The state's tensors are task-local (dropped with the task on failure): updated in place.
        with torch.no_grad():
            if not self.loss_term:
                self._segment(state, grads, self._advance(state, view), None)
                return state
            if self.loss == "train" and view.loss is None:  # the loop's batches are unknown
                if view.steps > 0 or state.probe is not None:
                    if state.probe is None:
                        raise ValueError(
                            f"leap(): the loop's training loss at step {view.steps} is unknown (its batch was "
                            "not seen): iterate the task (`for x, y in task`), return the loss from "
                            "opt.step(closure), or use warpopt.leap(loss='probe')"
                        )
                else:  # first step: this task takes ΔL on a probe batch, from θ_0
                    probe = view.task.task_batch(0)
                    state = state._replace(probe=probe, loss=self._probe_loss(view, probe, self._start(state, view)))
            if self.loss == "probe" or state.probe is not None:
                sq = self._advance(state, view)
                loss = self._probe_loss(view, state.probe)
                assert state.loss is not None  # set with the probe
                self._segment(state, grads, sq, loss - state.loss)
                return state._replace(loss=loss)
            view_loss = view.loss  # L(θ_k) on the loop's batch k: closes the open segment θ_{k-1} → θ_k
            if view_loss is None:
                raise RuntimeError("leap(loss='train') got no training loss for this step")
            loss = view_loss.detach().to(state.grad[0].device)
            grads = [g.detach() for g in grads]
            fresh = _apart(grads, state.seen)  # this step's gradients are not in last step's memory
            if state.sq is not None:  # the open segment's Δθ is in state.delta, its ∇L in last_grad
                assert state.loss is not None and state.last_grad is not None
                if state.last_grad is not state.spare and not fresh:
                    raise RuntimeError(
                        f"leap(): the gradients of step {view.steps} were written into the memory of step "
                        f"{view.steps - 1}'s, which Leap still needed, after earlier steps' were new tensors: "
                        "zero the gradients the same way at every step of a task (opt.zero_grad())"
                    )
                self._segment(state, state.last_grad, state.sq, loss - state.loss)
            sq = self._advance(state, view)  # opens θ_k → θ_{k+1}
            # ∇L(θ_k) waits for L(θ_{k+1}): a loop that hands out new gradient tensors at every step
            # (zero_grad() sets them to None) leaves these intact, so they are held, not copied
            last_grad = grads
            if not fresh:
                assert state.spare is not None  # allocated at begin_task for loss="train"
                last_grad = state.spare
                torch._foreach_copy_(last_grad, grads)
            return state._replace(loss=loss, sq=sq, last_grad=last_grad, seen=grads)

    def end_task(self, state: LeapState, view: TaskView) -> Tensors | None:
        return state.grad

    def __repr__(self) -> str:
        return f"Leap(loss_term={self.loss_term}, loss={self.loss!r})"


def _apart(tensors: Sequence[torch.Tensor], others: Sequence[torch.Tensor] | None) -> bool:
    """Whether no tensor of ``tensors`` shares memory with one of ``others`` (False if unknown)."""
    if others is None:
        return False
    try:
        taken = {t.untyped_storage().data_ptr() for t in others}
        return not any(t.untyped_storage().data_ptr() in taken for t in tensors)
    except (RuntimeError, NotImplementedError):  # e.g. sparse gradients: no plain storage
        return False


class Reptile(InitialisationLearner):
    """Reptile (Nichol et al., 2018): move θ0 towards θ_K; the gradient is θ0 − θ_K."""

    def end_task(self, state: Any, view: TaskView) -> Tensors | None:
        return [t0.detach() - p.detach() for t0, p in zip(view.theta0, view.params)]


class FOMAML(InitialisationLearner):
    """First-order MAML: ∇_θ L_meta(θ_K), the query loss gradient at the adapted point."""

    def end_task(self, state: Any, view: TaskView) -> Tensors | None:
        theta = [p.detach().requires_grad_(True) for p in view.params]
        task = view.task
        loss = task.meta_loss(view.context.forward_at(theta, view.buffers, task.training), task.meta_batch(view.steps))
        return list(torch.autograd.grad(loss, theta))


MAML_UNROLLS = ("loop", "replay")


class MAML(InitialisationLearner):
    """MAML (Finn et al., 2017; Eq. 1 with P = I), second order through all K task steps.

    The gradient is that of the trajectory the loop took: the task loss on the loop's batches
    (``Task.loop_batch``: for few-shot tasks, the support set), stepped with the task optimizer's
    update rule from θ0; L_meta is taken on a meta batch (the query set) with the adapt buffers
    the task started from. Warp parameters are held fixed in this term (Eq. 11 applies C only to
    θ0).

    Args:
        unroll: ``"loop"`` (default): the task loop itself builds the differentiable trajectory
            (``warpopt.loop``): each step's forward and backward run once, as in a hand-written
            MAML. ``"replay"``: the loop runs as usual and the K steps are replayed
            differentiably from θ0 when the task ends (each step's forward and backward run
            twice; no hooks on the model).
    """

    def __init__(self, unroll: str = "loop") -> None:
        if unroll not in MAML_UNROLLS:
            raise ValueError(f"maml(unroll=...) must be one of {MAML_UNROLLS}, got {unroll!r}")
        self.unroll = unroll

    @property
    def unrolls(self) -> bool:  # type: ignore[override]
        return self.unroll == "loop"

    def end_task(self, state: Any, view: TaskView) -> Tensors | None:
        ctx, task = view.context, view.task
        buffers = [b.detach() for b in view.start_buffers]
        loop = getattr(view, "loop", None)
        if loop is not None and loop.unroll:  # θ_K is already a graph of θ0: the loop built it
            return loop.theta0_gradient(
                task.meta_batch(view.steps), lambda theta: ctx.forward_at(theta, buffers, task.training)
            )
        else:
            batches = [task.loop_batch(k) for k in range(view.steps)]  # fails before any work if unknown
            recorded = getattr(view, "step_hypers", [])  # what each step used: its lr, its clipping
            theta0 = [t.detach().requires_grad_(True) for t in view.theta0]
            theta = theta0
            states: list[dict[str, torch.Tensor]] = [{} for _ in theta0]
            for k, batch in enumerate(batches):
                loss = task.task_loss(ctx.forward_at(theta, buffers, task.training), batch)
                grads = torch.autograd.grad(loss, theta, create_graph=True)
                theta, states = ctx.apply_step(theta, grads, states, recorded[k] if k < len(recorded) else None)
        loss = task.meta_loss(ctx.forward_at(theta, buffers, task.training), task.meta_batch(view.steps))
        return list(torch.autograd.grad(loss, theta0))

    def __repr__(self) -> str:
        return f"MAML(unroll={self.unroll!r})"


class MultiTask(InitialisationLearner):
    """Multi-task objective C_multi(θ0) = E_τ L_task(θ0) (Section 2.5 (a), Algorithm 3)."""

    def end_task(self, state: Any, view: TaskView) -> Tensors | None:
        theta = [t.detach().requires_grad_(True) for t in view.theta0]
        task = view.task
        loss = task.task_loss(view.context.forward_at(theta, view.start_buffers, task.training), task.task_batch(0))
        return list(torch.autograd.grad(loss, theta))


def leap(loss_term: bool = True, loss: str = "train") -> Leap:
    return Leap(loss_term, loss)


def reptile() -> Reptile:
    return Reptile()


def fomaml() -> FOMAML:
    return FOMAML()


def maml(unroll: str = "loop") -> MAML:
    return MAML(unroll)


def multitask() -> MultiTask:
    return MultiTask()


def none() -> NoInitialisation:
    return NoInitialisation()
