"""Tasks: a task's data and its two objectives, L_task and L_meta (Section 2.4).

A task τ = (h, L_task, L_meta). WarpGrad evaluates L_task and L_meta on *different, fresh*
batches of the task's data (Appendix E), so a task keeps its data source: the meta-objectives
draw batches from it long after the user's training loop has moved on.

A *batch loss* is a callable ``(forward, batch) -> scalar tensor`` where ``forward(*inputs)``
runs the model with the parameters under evaluation (the live ones, or replayed θ_k). For
supervised data, ``supervised(criterion)`` builds one from a criterion ``(output, target)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

Forward = Callable[..., Any]
BatchLoss = Callable[[Forward, Any], torch.Tensor]

__all__ = ["Task", "BatchLoss", "supervised", "cycle"]


def supervised(criterion: Callable[[Any, Any], torch.Tensor]) -> BatchLoss:
    """Batch loss ``criterion(forward(x), y)`` for batches ``(x, y)``."""

    def batch_loss(forward: Forward, batch: Any) -> torch.Tensor:
        inputs, target = batch
        return criterion(forward(inputs), target)

    batch_loss.criterion = criterion  # type: ignore[attr-defined]
    return batch_loss


def cycle(data: Any) -> Callable[[int], Any]:
    """A batch source ``k -> batch`` over ``data``.

    ``data`` is a callable ``k -> batch`` (used as is), a callable of no arguments, or an
    iterable (a DataLoader, a list of batches, an infinite generator) that is re-iterated
    whenever it runs out, so a finite loader yields fresh batches forever.
    """
    if callable(data) and not hasattr(data, "__iter__"):
        try:
            import inspect

            takes_k = len(inspect.signature(data).parameters) >= 1
        except (TypeError, ValueError):
            takes_k = True
        return data if takes_k else (lambda k: data())
    if not hasattr(data, "__iter__"):
        raise TypeError(
            f"task data must be an iterable of batches or a callable returning a batch, "
            f"got {type(data).__name__}"
        )
    state: dict[str, Optional[Iterator[Any]]] = {"it": None}

    def next_batch(k: int) -> Any:
        for _ in range(2):
            if state["it"] is None:
                state["it"] = iter(data)
            try:
                return next(state["it"])  # type: ignore[arg-type]
            except StopIteration:
                state["it"] = None
        raise ValueError("task data is empty: it yielded no batch")

    return next_batch


class Task:
    """One task τ: where its batches come from and how its losses are computed.

    Args:
        data: the task's training data (iterable of batches or callable, see ``cycle``);
            L_task is evaluated on fresh batches from it.
        loss_fn: criterion ``(output, target) -> loss`` for supervised batches ``(x, y)``.
        batch_loss: general batch loss ``(forward, batch) -> loss`` instead of ``loss_fn``.
        meta_data: data for L_meta (default: fresh batches of ``data``, as in the paper).
        meta_loss: batch loss for L_meta (default: the task's batch loss).
        name: for messages.

    ``task_batch(k)``/``meta_batch(k)`` receive the step index k of the replayed θ_k, so a
    task can make L_meta depend on where in the trajectory θ_k lies (continual learning, Eq. 19).

    ``loop_batch(k)`` is the batch the training loop itself used at step k (what MAML
    differentiates through): the batches of ``for batch in task`` (iterating the task yields
    its data once and keeps a reference to each batch: K batches per task, no copies), else
    ``data(k)`` for a callable source or ``data[k % len(data)]`` for a sequence.
    """

    def __init__(
        self,
        data: Iterable[Any] | Callable[..., Any],
        loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        *,
        batch_loss: Optional[BatchLoss] = None,
        meta_data: Optional[Iterable[Any] | Callable[..., Any]] = None,
        meta_loss: Optional[BatchLoss] = None,
        name: Optional[str] = None,
    ) -> None:
        if (loss_fn is None) == (batch_loss is None):
            raise ValueError(
                "give a task exactly one of loss_fn (a criterion (output, target) -> loss) "
                "or batch_loss (a callable (forward, batch) -> loss)"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.batch_loss: BatchLoss = batch_loss if batch_loss is not None else supervised(loss_fn)  # type: ignore[arg-type]
        self.meta_batch_loss: BatchLoss = meta_loss if meta_loss is not None else self.batch_loss
        self._data = data
        self._seen: list[Any] = []
        self._task_source = cycle(data)
        self._meta_source = cycle(meta_data) if meta_data is not None else self._task_source
        self.name = name

    def task_batch(self, k: int = 0) -> Any:
        """A fresh batch for L_task at step k."""
        return self._task_source(k)

    def meta_batch(self, k: int = 0) -> Any:
        """A fresh batch for L_meta at step k (a different draw from ``task_batch``)."""
        return self._meta_source(k)

    def __iter__(self) -> Iterator[Any]:
        """The task's data, once, each batch kept for ``loop_batch`` (use as ``for x, y in task``;
        several passes append: epochs)."""
        if callable(self._data) and not hasattr(self._data, "__iter__"):
            raise TypeError("this task's data is a callable k -> batch: loop over range(K) and call it "
                            "(or task.task_batch(k)) instead of iterating the task")
        for batch in self._data:  # type: ignore[union-attr]
            self._seen.append(batch)
            yield batch

    def start_loop(self) -> None:
        """Forget the batches seen so far (a new adaptation of this task starts at step 0)."""
        self._seen = []

    def loop_batch(self, k: int) -> Any:
        """The batch the training loop used at step k (see the class docstring)."""
        if k < len(self._seen):
            return self._seen[k]
        if callable(self._data) and not hasattr(self._data, "__iter__"):
            return self._task_source(k)
        if isinstance(self._data, Sequence) and len(self._data):
            return self._data[k % len(self._data)]
        raise ValueError(
            f"the batch of step {k} is unknown: the loop's batches of a one-shot iterable are only seen "
            "when the loop iterates the task itself (`with opt.task(data, loss_fn) as task: for x, y in "
            "task: ...`); or pass a list of batches or a callable k -> batch")

    def task_loss(self, forward: Forward, batch: Any) -> torch.Tensor:
        return self.batch_loss(forward, batch)

    def meta_loss(self, forward: Forward, batch: Any) -> torch.Tensor:
        return self.meta_batch_loss(forward, batch)

    def __repr__(self) -> str:
        return f"Task({self.name!r})" if self.name else "Task()"
