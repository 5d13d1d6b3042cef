"""Tasks: a task's data and its two objectives, L_task and L_meta (Section 2.4).

A task τ = (h, L_task, L_meta). WarpGrad evaluates L_task and L_meta on *different, fresh*
batches of the task's data (Appendix E), so a task keeps its data source: the meta-objectives
draw batches from it long after the user's training loop has moved on.

Where the draws come from depends on the kind of source (``Task`` documents the policy):
a callable ``k -> batch`` is called; a re-iterable (a list, a ``DataLoader``) is re-iterated by
an iterator of the task's own, so the loop's iteration is never touched; a one-shot iterator
(a generator, a ``DataLoader`` iterator) can be read only once, so the task reads it for the
loop and keeps the batches on a *tape* that the draws cycle over.

A *batch loss* is a callable ``(forward, batch) -> scalar tensor`` where ``forward(*inputs)``
runs the model with the parameters under evaluation (the live ones, or replayed θ_k). For
supervised data, ``supervised(criterion)`` builds one from a criterion ``(output, target)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Iterator as IteratorABC
from typing import Any

import torch

from .state_fit import check_task_state, same_batch

Forward = Callable[..., Any]
BatchLoss = Callable[[Forward, Any], torch.Tensor]

__all__ = ["Task", "BatchLoss", "supervised", "cycle"]


def supervised(criterion: Callable[[Any, Any], torch.Tensor]) -> BatchLoss:
    """Batch loss ``criterion(forward(x), y)`` for batches ``(x, y)``."""

    def batch_loss(forward: Forward, batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            kind = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise TypeError(
                f"a loss_fn (output, target) takes batches (inputs, target), got {kind}: pass "
                "batch_loss=lambda forward, batch: loss(forward(<inputs>), <target>) instead of loss_fn "
                "(e.g. forward(batch['x']), batch['y'] for dict batches)"
            )
        inputs, target = batch
        return criterion(forward(inputs), target)

    batch_loss.criterion = criterion  # type: ignore[attr-defined]
    return batch_loss


def _is_callable_source(data: Any) -> bool:
    return callable(data) and not hasattr(data, "__iter__")


def _callable_source(data: Callable[..., Any]) -> Callable[[int], Any]:
    try:
        import inspect

        takes_k = len(inspect.signature(data).parameters) >= 1
    except (TypeError, ValueError):
        takes_k = True
    return data if takes_k else (lambda k: data())


def cycle(data: Any) -> Callable[[int], Any]:
    """A batch source ``k -> batch`` over ``data``.

    ``data`` is a callable ``k -> batch`` (used as is), a callable of no arguments, or an
    iterable (a DataLoader, a list of batches, an infinite generator) that is re-iterated
    whenever it runs out, so a finite loader yields fresh batches forever.
    """
    if _is_callable_source(data):
        return _callable_source(data)
    source = _Pass(data)
    return source.draw


def _check_data(data: Any) -> None:
    if not (_is_callable_source(data) or hasattr(data, "__iter__")):
        raise TypeError(
            f"task data must be an iterable of batches or a callable returning a batch, got {type(data).__name__}"
        )


def _skipped(data: Iterable[Any], n: int, expected: Sequence[Any] = (), name: str | None = None) -> Iterator[Any]:
    """``iter(data)`` past its first ``n`` items (a position saved by a checkpoint), without drawing
    from the global RNG: the uninterrupted run drew for this pass before the checkpoint (an
    ``iter(DataLoader)`` draws a base seed, a shuffling sampler the seed of its permutation),
    and the saved RNG state already holds those draws. Skipped items that differ from
    ``expected`` (the batches the loop took before the checkpoint) are warned about once."""
    with torch.random.fork_rng(devices=[]):
        it = iter(data)
        skipped = [next(it, None) for _ in range(n)]
    if not all(same_batch(a, b) for a, b in zip(skipped, expected)):
        warnings.warn(
            f"task {name or ''!r} resumed from a checkpoint: its data does not start with the batches the loop "
            f"took before the checkpoint (a shuffling DataLoader reshuffles, or other data), so the resumed "
            f"task is not the interrupted one. Pass the same data, in the same order",
            RuntimeWarning,
            stacklevel=3,
        )
    return it


class _Pass:
    """Draws from a re-iterable source by an iterator of its own, re-iterated when it runs out.

    ``drawn`` counts the batches taken in the current pass: a checkpoint saves it and a resumed
    task skips that many batches of a fresh pass (exact for deterministic sources such as lists;
    a shuffling ``DataLoader`` reshuffles)."""

    def __init__(self, data: Any) -> None:
        _check_data(data)
        self.data, self.drawn, self.skip = data, 0, 0
        self.it: Iterator[Any] | None = None

    def draw(self, k: int) -> Any:
        for _ in range(2):
            if self.it is None:  # a fresh pass, or a resumed position (state_dict)
                self.it = _skipped(self.data, self.skip) if self.skip else iter(self.data)
                self.drawn, self.skip = self.skip, 0
            try:
                batch = next(self.it)
                self.drawn += 1
                return batch
            except StopIteration:
                self.it = None
        raise ValueError("task data is empty: it yielded no batch")

    def state(self) -> dict[str, Any]:
        return {"drawn": self.drawn if self.it is not None else self.skip}

    def load(self, state: dict[str, Any]) -> None:
        self.it, self.drawn, self.skip = None, 0, int(state["drawn"])


class _Tape:
    """The batches a one-shot iterator has produced, in order (references, no copies)."""

    def __init__(self, iterator: Iterator[Any] | None) -> None:
        self.iterator = iterator
        self.batches: list[Any] = []

    def pull(self) -> bool:
        """Read one more batch from the iterator onto the tape; False when it is exhausted."""
        if self.iterator is None:
            return False
        try:
            self.batches.append(next(self.iterator))
            return True
        except StopIteration:
            self.iterator = None
            return False


class _TapeDraws:
    """Draws from a one-shot source through its tape, cycling with a cursor.

    ``shared`` (the loop's own ``data``): batches are pulled from the iterator only while the
    tape is empty (for a draw before the loop's first batch, e.g. a probe; the loop still gets
    that batch from the tape), else the draws cycle over the batches the loop produced, so no
    draw takes a batch the loop would see. Not shared (a one-shot ``meta_data``, which only the
    draws read): each draw takes the next batch while the iterator has one, then they cycle."""

    def __init__(self, tape: _Tape, shared: bool) -> None:
        self.tape, self.shared, self.cursor = tape, shared, 0

    def draw(self, k: int) -> Any:
        batches = self.tape.batches
        if (not batches or (not self.shared and self.cursor >= len(batches))) and self.tape.pull():
            batches = self.tape.batches
        if not batches:
            raise ValueError(
                "task data is empty: the one-shot iterator (a generator or iterator) yielded no batch "
                "to the task. Iterate the task in the loop (`for x, y in task`) so that its batches are "
                "kept for the replay, or pass a list of batches or a callable k -> batch"
            )
        batch = batches[self.cursor % len(batches)]
        self.cursor += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])


class _Calls:
    def __init__(self, data: Callable[..., Any]) -> None:
        self.draw = _callable_source(data)

    def state(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        pass


class _NoData:
    def draw(self, k: int) -> Any:
        raise ValueError(
            "this task has no data (data=None): such a task only receives the batches a "
            "checkpoint saved for it (WarpGradMetaOptimizer.load_state_dict(..., tasks=...))"
        )

    def state(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        pass


def _kind(data: Any) -> str:
    if data is None:
        return "none"
    if _is_callable_source(data):
        return "callable"
    return "one-shot" if isinstance(data, IteratorABC) else "iterable"


class Task:
    """One task τ: where its batches come from and how its losses are computed.

    Args:
        data: the task's training data (iterable of batches or callable, see below);
            L_task is evaluated on batches drawn from it. ``None`` only for a task restored
            from a checkpoint (its draws come from the saved batches).
        loss_fn: criterion ``(output, target) -> loss`` for supervised batches ``(x, y)``.
        batch_loss: general batch loss ``(forward, batch) -> loss`` instead of ``loss_fn``.
        meta_data: data for L_meta (default: batches drawn from ``data``, as in the paper).
        meta_loss: batch loss for L_meta (default: the task's batch loss).
        name: for messages.

    ``task_batch(k)``/``meta_batch(k)`` are the draws for the meta-objectives and θ0 learners;
    they receive the step index k of the replayed θ_k, so a task can make L_meta depend on
    where in the trajectory θ_k lies (continual learning, Eq. 19). What a draw returns:

    - a callable ``data(k)`` (or ``data()``): its result;
    - a re-iterable (list, ``DataLoader``): the next batch of an iterator of the task's own,
      re-iterated when it runs out (fresh batches; the loop's own iteration is untouched);
    - a one-shot iterator (generator, ``iter(loader)``): the loop must read it through the task
      (``for x, y in task``); every batch it produces is kept on a tape (references to K
      batches, held until the replay buffer drops the task at ``meta_step()``) and the draws
      cycle over the tape. A draw before the loop's first batch reads that batch ahead onto the
      tape; the loop still gets it. Draws never consume a batch the loop would see, and an
      exhausted generator is never re-iterated.

    ``loop_batch(k)`` is the batch the training loop itself used at step k (what MAML
    differentiates through): the batches of ``for batch in task`` (iterating the task yields
    its data once and keeps a reference to each batch: K batches per task, no copies), else
    ``data(k)`` for a callable source or ``data[k % len(data)]`` for a sequence.

    ``start_step``: 0, or k when the task continues an adaptation a checkpoint interrupted after
    k steps (``resume``; ``WarpGradMetaOptimizer.task``): the loop starts there.
    """

    def __init__(
        self,
        data: Iterable[Any] | Callable[..., Any] | None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        *,
        batch_loss: BatchLoss | None = None,
        meta_data: Iterable[Any] | Callable[..., Any] | None = None,
        meta_loss: BatchLoss | None = None,
        name: str | None = None,
    ) -> None:
        if (loss_fn is None) == (batch_loss is None):
            raise ValueError(
                "give a task exactly one of loss_fn (a criterion (output, target) -> loss) "
                "or batch_loss (a callable (forward, batch) -> loss)"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if data is not None:
            _check_data(data)
        if meta_data is not None:
            _check_data(meta_data)
        self.batch_loss: BatchLoss = batch_loss if batch_loss is not None else supervised(loss_fn)  # type: ignore[arg-type]
        self.meta_batch_loss: BatchLoss = meta_loss if meta_loss is not None else self.batch_loss
        self._data = data
        #: the model's train/eval flags at the loop's first step (``objectives.module_modes``), which
        #: every replay of this task's steps runs in; None: the model as it is at replay time
        self.training: tuple[bool, ...] | None = None
        self._seen: list[Any] = []
        self._loop = 0  # one-shot data: how far the loop has read the tape
        self._skip = 0  # a resumed re-iterable: batches of the first pass the loop already took
        #: the step the loop starts at: 0, or k for a task resumed from a checkpoint taken after k steps
        self.start_step = 0
        self._tape = _Tape(data) if _kind(data) == "one-shot" else None  # type: ignore[arg-type]
        self._task_source = self._source(data, self._tape, shared=True)
        self._meta_source = self._task_source if meta_data is None else self._source(meta_data, None, shared=False)
        self.name = name

    @staticmethod
    def _source(data: Any, tape: _Tape | None, shared: bool) -> Any:
        kind = _kind(data)
        if kind == "none":
            return _NoData()
        if kind == "callable":
            return _Calls(data)
        if kind == "one-shot":
            return _TapeDraws(tape if tape is not None else _Tape(data), shared)
        return _Pass(data)

    @property
    def kind(self) -> str:
        """The kind of the loop's data: ``"callable"``, ``"iterable"``, ``"one-shot"`` or ``"none"``."""
        return _kind(self._data) if self._tape is None else "one-shot"

    def task_batch(self, k: int = 0) -> Any:
        """A batch for L_task at step k (see the class docstring for where it comes from)."""
        return self._task_source.draw(k)

    def meta_batch(self, k: int = 0) -> Any:
        """A batch for L_meta at step k (the next draw: a different batch from ``task_batch``)."""
        return self._meta_source.draw(k)

    def __iter__(self) -> Iterator[Any]:
        """The task's data, once, each batch kept for ``loop_batch`` (use as ``for x, y in task``;
        several passes over a re-iterable append: epochs; a one-shot iterator is read once)."""
        if self._data is None and self._tape is None:
            raise TypeError("this task has no data (data=None) to iterate")
        if _is_callable_source(self._data):
            raise TypeError(
                "this task's data is a callable k -> batch: loop over range(K) and call it "
                "(or task.task_batch(k)) instead of iterating the task"
            )
        if self._tape is None:
            # resumed: past the batches the loop took before the checkpoint
            batches = (
                _skipped(self._data, self._skip, self._seen, self.name) if self._skip else self._data  # type: ignore[arg-type]
            )
            self._skip = 0
            for batch in batches:  # type: ignore[union-attr]
                self._seen.append(batch)
                yield batch
            return
        tape = self._tape
        while self._loop < len(tape.batches) or tape.pull():  # batches read ahead by a draw come first
            batch = tape.batches[self._loop]
            self._loop += 1
            self._seen.append(batch)
            yield batch

    def start_loop(self) -> None:
        """Forget the batches seen so far (a new adaptation of this task starts at step 0)."""
        self._seen = []

    def batches_seen(self) -> int:
        """How many batches the loop has taken from the task in this adaptation."""
        return len(self._seen)

    def read_ahead(self) -> int:
        """Batches of a one-shot source read onto the tape by draws, before the loop took them.

        Nonzero at the loop's first step means the loop does not iterate the task: those batches
        will never reach it (iterate the task: ``for x, y in task``)."""
        return 0 if self._tape is None else len(self._tape.batches) - self._loop

    def can_draw(self) -> bool:
        """Whether the draws will have a batch. One-shot data: the tape holds one, else the iterator
        yields one more (read onto the tape, as the first draw would); False when a loop that read
        the iterator itself consumed it all. A re-iterable: unless its length is 0 (an empty list, a
        ``DataLoader`` whose ``drop_last`` leaves no batch); one without a length, and a callable,
        are taken to yield."""
        if self._tape is not None:
            return bool(self._tape.batches) or self._tape.pull()
        if self._seen:
            return True
        try:
            return len(self._data) > 0  # type: ignore[arg-type]
        except TypeError:
            return True

    def loop_batch(self, k: int) -> Any:
        """The batch the training loop used at step k (see the class docstring)."""
        if k < len(self._seen):
            return self._seen[k]
        if _is_callable_source(self._data):
            return self._task_source.draw(k)
        if isinstance(self._data, Sequence) and len(self._data):
            return self._data[k % len(self._data)]
        raise ValueError(
            f"the batch of step {k} is unknown: the loop's batches of data that is not a list (a generator, "
            "a DataLoader or its iterator) are only seen "
            "when the loop iterates the task itself (`with opt.task(data, loss_fn) as task: for x, y in "
            "task: ...`); or pass a list of batches or a callable k -> batch"
        )

    def task_loss(self, forward: Forward, batch: Any) -> torch.Tensor:
        return self._scalar(self.batch_loss(forward, batch), "loss")

    def meta_loss(self, forward: Forward, batch: Any) -> torch.Tensor:
        return self._scalar(self.meta_batch_loss(forward, batch), "meta loss")

    def _scalar(self, loss: Any, what: str) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"{self!r}: the {what} must be a scalar tensor (the mean over the batch, as "
                f"torch.nn.functional losses return by default), got {shape}"
            )
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Where the draws stand, for a checkpoint: the kind of each source, the tapes of one-shot
        sources (the batches themselves: tensors are saved, not the iterator) and the draw
        positions. Callables, iterators and loss functions are not saved: re-attach them."""
        meta_tape = getattr(self._meta_source, "tape", None)
        return {
            "name": self.name,
            "kind": self.kind,
            "tape": None if self._tape is None else list(self._tape.batches),
            "meta_tape": None if meta_tape is None or meta_tape is self._tape else list(meta_tape.batches),
            "task_source": self._task_source.state(),
            "meta_source": None if self._meta_source is self._task_source else self._meta_source.state(),
        }

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` if ``state`` (from ``state_dict``) cannot be loaded into this task."""
        check_task_state(state)
        label = repr(self.name or state.get("name") or "")
        if state["kind"] in ("callable", "iterable") and self.kind != state["kind"]:
            raise ValueError(
                f"task {label} was saved with {state['kind']} data: re-attach the same data "
                f"(this task's data is {self.kind})"
            )
        if (state["meta_source"] is None) != (self._meta_source is self._task_source):
            raise ValueError(
                f"task {label} was saved {'without' if state['meta_source'] is None else 'with'} "
                "meta_data: re-attach it the same way"
            )
        if state["meta_tape"] is None and state["meta_source"] is not None and isinstance(self._meta_source, _NoData):
            raise ValueError(f"task {label} was saved with callable or re-iterable meta_data: re-attach it")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the draws of a task saved by ``state_dict`` (this task re-attaches its data and
        losses). A saved tape replaces the one-shot source: the draws cycle over the saved batches."""
        self.check_state(state)
        if state["tape"] is not None:
            self._tape = _Tape(None)
            self._tape.batches = list(state["tape"])
            self._loop = len(self._tape.batches)
            shared = self._meta_source is self._task_source
            self._task_source = _TapeDraws(self._tape, shared=True)
            if shared:
                self._meta_source = self._task_source
        if state["meta_tape"] is not None:
            tape = _Tape(None)
            tape.batches = list(state["meta_tape"])
            self._meta_source = _TapeDraws(tape, shared=False)
        self._task_source.load(state["task_source"])
        if state["meta_source"] is not None and self._meta_source is not self._task_source:
            self._meta_source.load(state["meta_source"])

    def progress_state(self) -> dict[str, Any]:
        """The loop's side of an adaptation in progress (a checkpoint between two task steps): the
        batches the loop took through the task (``loop_batch``, saved as they are) and how far it
        read a one-shot source's tape."""
        return {"seen": list(self._seen), "loop": self._loop}

    def resume(self, state: dict[str, Any], progress: dict[str, Any], steps: int) -> None:
        """Continue an adaptation saved after ``steps`` steps (``state_dict`` and ``progress_state``
        of the interrupted task). This task's data provides the batches from there on: the same
        callable; the same re-iterable (iterating the task skips the first k batches, those of the
        steps taken); for one-shot data, an iterator of the batches after those the saved tape
        holds (or ``None``). Iterating the task then yields the batch of step k first."""
        iterator = self._data if isinstance(self._data, IteratorABC) else None
        self.load_state_dict(state)
        # A batch the loop took but took no step on (a checkpoint at the top of the loop body)
        # comes again: iterating the task resumes with the batch of step k.
        seen = list(progress["seen"])
        self._seen, self.start_step = seen[:steps], int(steps)
        if state["tape"] is not None:
            assert self._tape is not None  # load_state_dict put the saved tape in place
            self._tape.iterator = iterator
            self._loop = int(progress["loop"]) - (len(seen) - len(self._seen))
        else:  # one batch per step: the loop's next batch is the (k+1)-th of the data
            self._skip = int(steps)

    def check_resume(self, progress: dict[str, Any], steps: int) -> None:
        """``ValueError`` when this task's data is a sequence (a list of batches) whose first
        ``steps`` batches are not those the interrupted loop took (``progress_state``): other data,
        or data the caller already advanced (iterating the task skips them itself)."""
        if not isinstance(self._data, Sequence):
            return
        seen = progress["seen"][:steps]
        if len(seen) > len(self._data):  # the resumed pass would skip past its end
            raise ValueError(
                f"task {self.name or ''!r} was checkpointed after {steps} steps, more than one pass over its "
                f"{len(self._data)} batches: resuming inside a later pass over the task (epochs) is not supported. "
                "Checkpoint during the first pass or between tasks"
            )
        if not all(same_batch(a, b) for a, b in zip(self._data, seen)):
            raise ValueError(
                f"task {self.name or ''!r} resumed from a checkpoint after {steps} steps: its data does not start "
                "with the batches the loop took before the checkpoint. Pass the same list as before, from its "
                "start (iterating the task skips the batches of the steps taken)"
            )

    def __repr__(self) -> str:
        return f"Task({self.name!r})" if self.name else "Task()"
