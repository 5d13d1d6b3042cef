"""The task loop seen from the optimizer: the model's forwards at each step, and MAML's
differentiable trajectory built by the loop itself.

While a task adapts, a ``Loop`` hooks the root module (a forward pre-hook and a forward hook,
removed when the task ends). It acts only on the forwards of the user's loop: the library's own
forwards (``torch.func.functional_call`` in the replay, Leap's probe, the fallbacks below) run
with other tensors in place of the module's parameters, and those calls are left alone.

**Capture** (Leap, Eq. 13). Each forward of the loop is kept, with its inputs, until the next
``step()``. ``loss(k)`` evaluates the task loss on the loop's batch k (``Task.loop_batch``) with
the output the loop already computed when the forward's inputs are the batch's inputs (the same
tensors, or views of the same memory): the training loss L(θ_k) without another forward.

**Unroll** (MAML, Eq. 1). The loop builds θ_0 → θ_1 → … → θ_K as an autograd graph of θ0:

1. during the user's ``model(x)``, the module's adapt parameters are the graph tensors θ_k
   (swapped in as ``functional_call`` does, swapped out when the call returns); while such a
   task adapts, the process runs the twice-differentiable kernels of ``warpopt.kernels``;
2. the outputs pass through ``_Tap``, an identity whose backward stops the user's
   ``loss.backward()`` at the model output. There the task loss on the loop's batch is
   recomputed from that output (no forward) and differentiated once with ``create_graph``:
   g_k = ∇θ_k L_task(θ_k) with its graph; its value goes to the live parameters' ``.grad``,
   where the user's backward would have put it;
3. ``step()`` takes θ_{k+1} = U(θ_k, g_k) with the task optimizer's functional update (a graph
   node) while the live parameters take the user's torch optimizer step.

The MAML meta-gradient is one backward of L_meta(θ_K) to θ0 (``theta0``): each step's forward and
backward run once, as in a hand-written MAML. Warp-MAML (``online()`` + ``exact``) also reads its
per-step warp meta-gradient (Eq. 7 at θ_k, θ_k held fixed) off the same graph: each step then sees
the warp parameters as a fresh alias φ_k, so differentiating L_meta(U(θ_k, g_k(φ_k)); φ_k) to φ_k
stops at θ_k (``warp_gradient``).

What the loop's forward and backward must be for the fast path: one forward of the root module
per step whose output the loss uses, and a loss equal to the task's loss on the loop's batch
(checked on the device at every step, raised at the end of the task: ``check``). Anything else
(a forward of a submodule, two forwards, inputs that are not the loop's batch) is still exact:
the step's graph gradient is then recomputed by a functional forward (the old cost) and the
user's ``.grad`` is the plain vector-Jacobian product of their own backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .kernels import replay_kernels
from .tasks import Task

__all__ = ["Loop", "same"]

Tensors = list[torch.Tensor]


def same(a: Any, b: Any) -> bool:
    """Whether two batches (or call arguments) are the same data: the same objects, or tensors
    viewing the same memory the same way, in the same structure."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.layout != torch.strided or b.layout != torch.strided or a.device.type == "meta":
            return False
        return (
            a.device == b.device
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr()
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


class _Unmatched(Exception):
    """The task loss called the model with inputs the loop's forward did not see."""


@dataclass
class _Forward:
    """One forward of the user's loop: its inputs, its output (structure as returned) and, when
    unrolled, the θ_k it ran on and its output tensors that carry a graph."""

    step: int
    args: tuple
    kwargs: dict
    output: Any
    theta: Tensors = field(default_factory=list)
    graph_outputs: Tensors = field(default_factory=list)
    backwards: int = 0
    autocast: tuple[str, torch.dtype] | None = None  # the torch.autocast the forward ran under
    rng: RNGState | None = None  # the global RNG when the forward began (unrolled: its dropout masks)


def _autocast_at(device: torch.device) -> tuple[str, torch.dtype] | None:
    """(device type, dtype) of the ``torch.autocast`` active for ``device``, None if off."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
        return device.type, torch.get_autocast_dtype(device.type)
    except TypeError:  # torch < 2.4: no device_type argument
        return None


class _Tap(torch.autograd.Function):
    """The model's outputs, cut from the model's graph; the backward computes the step's gradient
    (``Loop._backward``). The outputs are passed in detached, and the only edge of this node is
    to ``anchor`` (a grad-requiring scalar that receives nothing), so the user's backward ends
    here and never frees the forward's saved tensors, which the unrolled graph still needs
    (a ``None`` gradient alone would not stop the engine from visiting, and freeing, them)."""

    @staticmethod
    def forward(
        ctx: Any, loop: Loop, entry: _Forward, anchor: torch.Tensor, *outputs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.loop, ctx.entry = loop, entry
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:
        ctx.loop._backward(ctx.entry, list(grads))
        return (None, None, None) + (None,) * len(grads)


MOVED_IN_TASK = (
    "the model moved (device or dtype) inside a task: what the task recorded is in the old placement. "
    "Move the model between tasks (after meta_step(): θ0 and the optimizers' state follow it); this "
    "task was rolled back"
)


COMPILED = (
    "maml() builds the task's trajectory through the loop's own forward and differentiates it twice, "
    "which torch.compile'd graphs do not support (aot_autograd has no double backward): call the "
    "model uncompiled in this loop, or use maml(unroll='replay'), whose loop stays first order"
)


@contextlib.contextmanager
def _explain_compiled() -> Iterator[None]:
    """torch's error for a compiled forward differentiated twice, re-raised saying what to do."""
    try:
        yield
    except RuntimeError as error:
        if "does not currently support double backward" in str(error):
            raise RuntimeError(COMPILED) from error
        raise


RNGState = tuple[torch.Tensor, Tensors]  # the CPU generator's state, each CUDA device's (as listed)


def rng_state(cuda: Sequence[int]) -> RNGState:
    """The global RNG's state: the CPU generator's and the CUDA devices' ``cuda`` (a few KB)."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]


def set_rng_state(state: RNGState, cuda: Sequence[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(cuda, state[1]):
        torch.cuda.set_rng_state(s, d)


def _zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> Tensors:
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, like)]


class Loop:
    """The hooks and per-task state described in the module docstring.

    Args:
        module: the root module the user's loop calls.
        task: the task being adapted (its losses and ``loop_batch``).
        adapt_names / live: the adapt parameters θ (qualified names, live ``nn.Parameter``s).
        buffer_names / buffers: the adapt buffers (live).
        theta0: where the task starts (θ_0 values; unrolled from a leaf copy of them).
        warp: the warp parameters φ, aliased per step when ``warp_term`` is set.
        unroll: build the differentiable trajectory (MAML); else only capture forwards.
    """

    def __init__(
        self,
        module: nn.Module,
        task: Task,
        adapt_names: Sequence[str],
        live: Sequence[torch.Tensor],
        buffer_names: Sequence[str],
        buffers: Sequence[torch.Tensor],
        theta0: Sequence[torch.Tensor],
        warp: Sequence[torch.Tensor] = (),
        *,
        unroll: bool = False,
        warp_term: bool = False,
    ) -> None:
        self.module, self.task = module, task
        self.adapt_names, self.live = list(adapt_names), list(live)
        self.buffer_names, self.buffers = list(buffer_names), list(buffers)
        self.warp = list(warp) if warp_term else []
        self.unroll = unroll
        # Where each swapped parameter sits in the module tree: every (module, attribute) holding
        # it, so tied weights are swapped everywhere (as functional_call's tie_weights does); and
        # the first qualified name of each (one walk of the tree, as named_parameters does).
        where: dict[int, list[tuple[nn.Module, str]]] = {}
        name_of: dict[int, str] = {}
        self._rnn = False
        for prefix, owner in module.named_modules(remove_duplicate=False):
            self._rnn = self._rnn or isinstance(owner, nn.RNNBase)
            for leaf, p in owner._parameters.items():
                if p is not None:
                    where.setdefault(id(p), []).append((owner, leaf))
                    name_of.setdefault(id(p), f"{prefix}.{leaf}" if prefix else leaf)
        self.warp_names = [name_of[id(w)] for w in self.warp]
        self._slots = [where.get(id(p), []) for p in self.live + self.warp]
        first_owner, first_leaf = self._slots[0][0]
        self._probe = (first_owner, first_leaf, self.live[0])  # does the module hold θ live?
        # The unrolled forwards are differentiated twice: twice-differentiable kernels for the
        # whole task (process-wide flags, as in the replay; restored by ``remove``).
        self._kernels = contextlib.ExitStack()
        if unroll:
            self._kernels.enter_context(replay_kernels(module, rnn=self._rnn))
        self.step_index = 0
        # The RNG state each unrolled step's graph gradient was drawn with (the forward it came
        # from), and the pending Eq. 7 term's: a task resumed from a checkpoint rebuilds the graph
        # with the same dropout masks (``warpopt.task_checkpoint``). CUDA: the adapt devices'.
        self.cuda = sorted({t.device.index or 0 for t in live if t.device.type == "cuda"}) if unroll else []
        self.rngs: list[RNGState] = []
        self.graph_rng: RNGState | None = None
        self.step_rng: RNGState | None = None
        self.pending_rng: RNGState | None = None
        self._pre_rng: RNGState | None = None
        self.forwards: list[_Forward] = []
        self.graph_grads: Tensors | None = None  # g_k with its graph, from the tap
        # θ_0's leaves alias ``theta0`` (the session's private copy of where the task starts)
        self.theta0: Tensors = [t.detach().requires_grad_(True) for t in theta0] if unroll else []
        self.theta: Tensors = list(self.theta0)
        self.states: list[dict[str, torch.Tensor]] = [{} for _ in self.theta0]
        self.phi: Tensors = self._alias_phi()
        # (the loop's gradient at the model output, the task loss's), per step: must agree (``check``)
        self.compare: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending: tuple[torch.Tensor, Tensors, Any] | None = None  # Eq. 7 term: (loss, φ_k, meta batch)
        self.merged: Tensors | None = None  # its φ gradient, when computed with the θ0 term
        self.faithful = True  # every step so far was the loop's (its forward and loss seen): θ_k is the live θ_k
        self._anchors: dict[torch.device, torch.Tensor] = {}  # see _Tap
        self._inside: contextlib.ExitStack | None = None
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]

    # ------------------------------------------------------------------ hooks
    def _is_users(self) -> bool:
        owner, leaf, live = self._probe
        return owner._parameters.get(leaf) is live

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._inside is not None or not self._is_users():
            return None  # a nested call, or one of the library's functional forwards
        stack = contextlib.ExitStack()
        if self.unroll:
            live, theta = self.live[0], self.theta[0]
            if live.dtype != theta.dtype or live.device != theta.device:
                raise RuntimeError(MOVED_IN_TASK)
            stack.callback(self._swap(self.theta + self.phi))
            self._pre_rng = rng_state(self.cuda)  # a memcpy of ~5 KB (CPU) per forward
        self._inside = stack
        return None

    def _swap(self, tensors: Sequence[torch.Tensor]) -> Callable[[], None]:
        """Put ``tensors`` where the live parameters sit (θ, then φ if aliased); returns the undo."""
        saved = []
        for slots, t in zip(self._slots, tensors):
            for owner, leaf in slots:
                saved.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = t  # type: ignore[assignment]

        def undo() -> None:
            for owner, leaf, p in reversed(saved):
                owner._parameters[leaf] = p

        return undo

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        stack, self._inside = self._inside, None
        if stack is None:
            return None
        stack.close()
        if output is None:  # the forward raised (always_call): parameters are back, nothing to keep
            return None
        if not self.unroll:
            detached = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, output)
            self.forwards.append(_Forward(self.step_index, args, kwargs, detached))
            return None
        # the usual case, a single tensor, has no tree to walk
        leaves, spec = ([output], None) if type(output) is torch.Tensor else pytree.tree_flatten(output)
        graph = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        entry = _Forward(self.step_index, args, kwargs, output, list(self.theta), [leaves[i] for i in graph])
        entry.rng, self._pre_rng = self._pre_rng, None
        if graph:
            entry.autocast = _autocast_at(leaves[graph[0]].device)
        self.forwards.append(entry)
        if not graph:
            return None
        device = entry.graph_outputs[0].device
        anchor = self._anchors.get(device)
        if anchor is None:
            anchor = self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        tapped = _Tap.apply(self, entry, anchor, *(o.detach() for o in entry.graph_outputs))
        if spec is None:  # a single tensor
            return tapped[0]
        for i, t in zip(graph, tapped):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, spec)

    def remove(self) -> None:
        """Take the hooks off the module (the task ended)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._inside is not None:
            self._inside.close()
            self._inside = None
        self._kernels.close()

    # ------------------------------------------------------------------ the loop's losses
    def _replaying(self, entry: _Forward, output: Any = None) -> Callable[..., Any]:
        """A ``forward`` for the task loss that returns ``entry``'s output (or ``output``) for
        its own inputs."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            if same(args, entry.args) and same(kwargs, entry.kwargs):
                return entry.output if output is None else output
            raise _Unmatched

        return forward

    def _direct(self, entry: _Forward, batch: Any) -> Tensors:
        """The task loss's gradient at each graph output taken as an input of its own (what the
        user's backward sends into the tap); differs from the total derivative when one output is
        computed from another (a hidden state returned beside the prediction)."""
        stand = [o.detach().requires_grad_(True) for o in entry.graph_outputs]
        leaves, spec = pytree.tree_flatten(entry.output)
        it = iter(stand)
        leaves = [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in leaves]
        loss = self.task.task_loss(self._replaying(entry, pytree.tree_unflatten(leaves, spec)), batch)
        return _zeros_for_none(torch.autograd.grad(loss, stand, allow_unused=True), stand)

    def _loop_batch(self, k: int) -> Any:
        try:
            return self.task.loop_batch(k)
        except ValueError:
            return _Unmatched

    def loss(self, k: int, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """L_task(θ_k) on the loop's batch k, from the loop's own forward when its inputs were
        the batch's, else by a forward at ``params`` (θ_k) with the adapt buffers copied; None
        when the batch is unknown (a one-shot iterable or loader the loop iterates by itself)."""
        batch = self._loop_batch(k)
        if batch is _Unmatched:
            return None
        with torch.no_grad():
            for entry in self.forwards:
                if entry.step == k:
                    try:
                        return self.task.task_loss(self._replaying(entry), batch).detach()
                    except _Unmatched:
                        continue
            return self.task.task_loss(self._functional([p.detach() for p in params], []), batch).detach()

    def _functional(self, theta: Sequence[torch.Tensor], phi: Sequence[torch.Tensor]) -> Callable[..., Any]:
        mapping = dict(zip(self.adapt_names, theta))
        mapping.update(zip(self.warp_names, phi))
        mapping.update(zip(self.buffer_names, (b.clone() for b in self.buffers)))
        module, rnn = self.module, self._rnn

        def forward(*args: Any, **kwargs: Any) -> Any:
            with replay_kernels(module, rnn=rnn):
                return functional_call(module, mapping, args, kwargs, strict=False)

        return forward

    # ------------------------------------------------------------------ unroll
    def _alias_phi(self) -> Tensors:
        return [w.detach().requires_grad_(True) for w in self.warp]

    def _backward(self, entry: _Forward, grads: Tensors) -> None:
        """The tap's backward: the user's ``loss.backward()`` reached the model output."""
        entry.backwards += 1
        with torch.enable_grad():
            matched = None
            if entry.backwards == 1 and sum(e.backwards for e in self.forwards) == 1:
                batch = self._loop_batch(entry.step)
                if batch is not _Unmatched:
                    # under the loop's autocast, as the loop computed its loss: the same gradient
                    autocast = torch.autocast(*entry.autocast) if entry.autocast else contextlib.nullcontext()
                    try:
                        with autocast:
                            matched = self.task.task_loss(self._replaying(entry), batch)
                    except _Unmatched:
                        matched = None
            if matched is not None:
                # to θ_k (g_k still depends on φ_k for Eq. 7, but ∇φ L_task is not needed), and to
                # a single output for the check; one backward with its graph
                single = entry.graph_outputs if len(entry.graph_outputs) == 1 else []
                wrt = entry.theta + single
                both = _zeros_for_none(torch.autograd.grad(matched, wrt, create_graph=True, allow_unused=True), wrt)
                g = both[: len(entry.theta)]
                dout = both[len(entry.theta) :] if single else self._direct(entry, batch)
                # compared at the end of the task, all steps at once (``check``)
                self.compare.extend((u.detach(), d.detach()) for u, d in zip(grads, dout))
                self.graph_grads = g if entry.step == self.step_index else None
                self.graph_rng = entry.rng
                plain = g  # copied below, without its graph
            else:  # not the step's one matched backward: the plain product, the graph gradient later
                self.graph_grads = None
                plain = _zeros_for_none(
                    torch.autograd.grad(
                        entry.graph_outputs, entry.theta, grad_outputs=grads, retain_graph=True, allow_unused=True
                    ),
                    entry.theta,
                )
        with torch.no_grad():  # (no graph is recorded: ``plain`` may be the graph's g_k)
            for p, g_p in zip(self.live, plain):
                if p.grad is None:
                    p.grad = g_p.clone()  # the graph's own tensor stays out of the user's reach
                else:
                    p.grad.add_(g_p)

    def gradient(self, k: int) -> Tensors:
        """g_k = ∇θ_k L_task(θ_k; loop batch k) with its graph (of θ_k and, for Warp-MAML, φ_k):
        the tap's when the loop's backward gave it, else by a functional forward at θ_k."""
        grads, self.step_rng = self.graph_grads, self.graph_rng
        if grads is None:
            # From here on the unrolled trajectory follows the loop's batches by definition, but
            # nobody saw the loop step on them: it may differ from the live one (no fast Eq. 7)
            self.faithful = False
            batch = self.task.loop_batch(k)  # unknown batch: ValueError naming the fixes
            self.step_rng = rng_state(self.cuda)
            grads = self.functional_gradient(self.theta, self.phi, batch)
        return grads

    def functional_gradient(self, theta: Sequence[torch.Tensor], phi: Sequence[torch.Tensor], batch: Any) -> Tensors:
        """∇θ L_task(θ; φ, ``batch``) with its graph (of θ and φ), by a functional forward at θ
        (a step the loop's backward did not give, and the rebuild of a resumed task)."""
        with torch.enable_grad():
            loss = self.task.task_loss(self._functional(theta, phi), batch)
            return _zeros_for_none(torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True), theta)

    def warp_loss(self, k: int, theta: Sequence[torch.Tensor]) -> tuple[Any, Any] | None:
        """Eq. 7 at θ_k with θ_k fixed, read off the unrolled step: L_meta(θ_{k+1}; φ_k) with
        θ_{k+1} = ``theta`` = U(θ_k, g_k(φ_k)); its gradient to φ_k stops at θ_k.

        Draws the task batch, then the meta batch, as the ``exact`` objective does. When the task
        batch is the loop's batch k (the objective's inner step is the step the loop took), the
        loss is kept *pending*: its backward runs at the next step (``warp_gradient``), or at the
        end of the task together with MAML's θ0 term when that is taken on the same meta batch
        (``theta0_gradient``: one backward of L_meta(θ_K) serves both). Returns None then, else the
        drawn (task batch, meta batch) for the caller to replay the objective on."""
        task_batch = self.task.task_batch(k)
        meta_batch = self.task.meta_batch(k)
        loop_batch = self._loop_batch(k)
        if not self.faithful or loop_batch is _Unmatched or not same(task_batch, loop_batch):
            return task_batch, meta_batch
        rng = rng_state(self.cuda)
        with torch.enable_grad():
            loss = self.task.meta_loss(self._functional(theta, self.phi), meta_batch)
        self.pending_rng = rng
        self.pending = (loss, list(self.phi), meta_batch)
        return None

    def warp_gradient(self) -> Tensors | None:
        """The pending Eq. 7 term's gradient to φ (None if nothing is pending)."""
        if self.pending is None:
            return None
        loss, phi, _ = self.pending
        self.pending = None
        if self.merged is not None:
            grads, self.merged = self.merged, None
            return grads
        with torch.enable_grad(), _explain_compiled():  # retained: the step's graph is still needed by the θ0 term
            return _zeros_for_none(torch.autograd.grad(loss, phi, retain_graph=True, allow_unused=True), phi)

    def theta0_gradient(
        self, meta_batch: Any, forward: Callable[[Sequence[torch.Tensor]], Callable[..., Any]]
    ) -> Tensors:
        """∇θ0 L_meta(θ_K) through the unrolled steps (MAML). When the pending Eq. 7 term is
        L_meta(θ_K; φ_{K-1}) on this same meta batch, its forward and backward serve both terms
        (φ held fixed in this one: only θ0 is asked for here; a model with adapt buffers is
        evaluated with the buffers the task started from, so it gets its own forward); else
        ``forward(θ_K)`` runs it."""
        with torch.enable_grad(), _explain_compiled():
            if self.pending is not None and not self.buffers and same(self.pending[2], meta_batch):
                loss, phi, _ = self.pending
                grads = torch.autograd.grad(loss, self.theta0 + phi, allow_unused=True)
                n = len(self.theta0)
                self.merged = _zeros_for_none(grads[n:], phi)
                return _zeros_for_none(grads[:n], self.theta0)
            if self.pending is not None:  # its own backward first: the one below frees the steps' graphs
                loss, phi, _ = self.pending
                self.merged = _zeros_for_none(torch.autograd.grad(loss, phi, retain_graph=True, allow_unused=True), phi)
            loss = self.task.meta_loss(forward(self.theta), meta_batch)
            return _zeros_for_none(torch.autograd.grad(loss, self.theta0, allow_unused=True), self.theta0)

    def advance(self, theta: Sequence[torch.Tensor], states: Sequence[dict[str, torch.Tensor]]) -> None:
        """The step was taken: θ_{k+1} (graph) and its optimizer state; forget the step's forwards."""
        if self.unroll:
            self.theta, self.states = list(theta), list(states)
            self.phi = self._alias_phi()
            assert self.step_rng is not None  # set by ``gradient``
            self.rngs.append(self.step_rng)
        self.forwards, self.graph_grads, self.graph_rng, self.step_rng = [], None, None, None
        self.step_index += 1

    def check(self) -> None:
        """Raise if, at some step, the gradient the loop's loss sent into the model output was not
        the task loss's (one host synchronisation, at the end of the task)."""
        if not self.compare:
            return
        with torch.no_grad():
            mismatch = not bool(
                torch.isclose(
                    torch.cat([u.reshape(-1) for u, _ in self.compare]),
                    torch.cat([d.reshape(-1) for _, d in self.compare]),
                    rtol=1e-5,
                    atol=1e-8,
                ).all()
            )
        self.compare = []
        if mismatch:
            raise ValueError(
                "MAML differentiates the task's loss on the loop's batches, but the loss this loop "
                "backpropagated gave the model output a different gradient (a different criterion, a "
                "scaled or regularised loss): pass the loop's loss as the task's loss_fn / batch_loss, or "
                "use warpopt.maml(unroll='replay') to replay the task loss after the loop"
            )
