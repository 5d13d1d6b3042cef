"""Whether a saved state fits the live optimizer: the checks ``load_state_dict`` runs before it
writes anything (``warpopt.checkpoint``, ``warpopt.task_checkpoint``). Each raises a
``ValueError`` naming the state_dict field that does not fit. ``same_batch`` tells whether the
data given on resume repeats the batches a task saved (``warpopt.tasks``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .step_hypers import from_plain

__all__ = [
    "check_optimizer_state",
    "check_tensors",
    "check_points",
    "check_count",
    "check_replay_state",
    "check_hypers",
]


def check_count(field: str, value: Any) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"state_dict field {field!r}: a count (an integer ≥ 0) expected, got {value!r}")


def check_replay_state(field: str, saved: Any) -> None:
    """``ReplayBuffer.state_dict``: its generator's state and the reservoir's count."""
    generator = saved.get("generator") if isinstance(saved, dict) else None
    if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
        raise ValueError(f"state_dict field {field!r}: expected {{'generator': a uint8 tensor, 'offered': int}}")
    check_count(f"{field}.offered", saved.get("offered"))


def check_hypers(field: str, saved: Any) -> None:
    """What a step used (``warpopt.step_hypers.to_plain``), or None."""
    try:
        from_plain(saved)
    except (TypeError, KeyError, ValueError, IndexError) as error:
        raise ValueError(f"state_dict field {field!r} is not a step's hyper-parameters ({error!r})") from None


def check_optimizer_state(field: str, saved: Any, live: torch.optim.Optimizer | None) -> None:
    if (saved is None) != (live is None):
        raise ValueError(
            f"state_dict field {field!r}: saved {'nothing' if saved is None else 'a state'}, "
            f"this optimizer has {'none' if live is None else 'one'}"
        )
    if live is None:
        return
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if groups is None or len(groups) != len(live.param_groups):
        raise ValueError(
            f"state_dict field {field!r}: {0 if groups is None else len(groups)} param groups, "
            f"this optimizer has {len(live.param_groups)}"
        )
    for i, (g, h) in enumerate(zip(groups, live.param_groups)):
        if len(g["params"]) != len(h["params"]):
            raise ValueError(
                f"state_dict field {field!r}: param group {i} has {len(g['params'])} parameters, "
                f"this optimizer's has {len(h['params'])}"
            )
    params = [p for h in live.param_groups for p in h["params"]]
    ids = [i for g in groups for i in g["params"]]
    for pid, p in zip(ids, params):
        for key, value in saved["state"].get(pid, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                raise ValueError(
                    f"state_dict field {field!r}: state {key!r} has shape {tuple(value.shape)}, "
                    f"its parameter {tuple(p.shape)}"
                )


def check_tensors(field: str, saved: Any, live: Sequence[torch.Tensor]) -> None:
    if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
        raise ValueError(
            f"state_dict field {field!r}: expected {len(live)} tensors, got "
            f"{len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__}"
        )
    for i, (s, t) in enumerate(zip(saved, live)):
        if not isinstance(s, torch.Tensor) or s.shape != t.shape or s.dtype != t.dtype:
            got = (tuple(s.shape), s.dtype) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"state_dict field {field!r}[{i}]: expected {tuple(t.shape)} {t.dtype}, got {got}")


def check_points(field: str, points: Any, theta0: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> None:
    """Recorded points (``ReplayBuffer.contents`` / a trajectory in progress) that fit the model:
    θ like ``theta0``, buffers like ``buffers``, one optimizer state per parameter."""
    if not isinstance(points, list):
        raise ValueError(f"state_dict field {field!r}: a list of points expected")
    for j, point in enumerate(points):
        where = f"{field}[{j}]"
        if not isinstance(point, dict) or not {"step", "params", "states", "buffers"} <= set(point):
            raise ValueError(f"state_dict field {where!r} is not a recorded point")
        check_tensors(where + ".params", point["params"], theta0)
        check_tensors(where + ".buffers", point["buffers"], buffers)
        states = point["states"]
        if not isinstance(states, list) or len(states) != len(theta0):
            raise ValueError(f"state_dict field {where + '.states'!r}: one optimizer state per parameter expected")
        for st, p in zip(states, theta0):
            for key, value in st.items():
                if not isinstance(value, torch.Tensor) or (value.dim() and value.shape != p.shape):
                    raise ValueError(
                        f"state_dict field {where + '.states'!r}: {key!r} does not fit its parameter {tuple(p.shape)}"
                    )


def check_task_state(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` has the form ``Task.state_dict`` gives (checked when a
    checkpoint loads, before anything is written, rather than failing when the task resumes)."""
    if not isinstance(state, dict) or not {"kind", "tape", "meta_tape", "task_source", "meta_source"} <= set(state):
        raise ValueError("not a Task state_dict")
    if state["kind"] not in ("callable", "iterable", "one-shot", "none") or not isinstance(
        state.get("name"), (str, type(None))
    ):
        raise ValueError(f"not a Task state_dict: kind {state['kind']!r}, name {state.get('name')!r}")
    for key in ("tape", "meta_tape"):
        if not isinstance(state[key], (list, type(None))):
            raise ValueError(f"Task state_dict {key!r}: a list of batches or None expected")
    for key in ("task_source", "meta_source"):
        source = state[key]
        if not (source is None and key == "meta_source") and not (
            isinstance(source, dict) and all(type(v) is int for v in source.values())
        ):
            raise ValueError(f"Task state_dict {key!r}: draw positions (integers) expected, got {source!r}")


def same_batch(a: Any, b: Any) -> bool:
    """Whether two batches are equal (tensors bit for bit, containers element-wise); True when
    their elements cannot be compared."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b.to(a.device))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_batch(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_batch(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # e.g. numpy arrays: cannot tell, do not complain
        return True
