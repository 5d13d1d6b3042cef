"""Which modules :func:`warpopt.warp` touches: selectors and the output-layer rule.

Selectors (``where=``, ``designate=``, ``exclude=``) take a module type or tuple of types, a
predicate ``(qualified_name, module) -> bool``, or module names: a qualified name
(``"encoder.rnn"``), a glob pattern over qualified names (``"blocks.*.fc1"``; ``*`` also
matches dots) or an iterable of names and patterns.

The default selection warps every task layer (Conv1d/2d/3d, Linear, RNN/LSTM/GRU) except the
*output layers*, whose output is the model's output: a warp there would only reshape the
prediction, not precondition a hidden layer (Appendix A interleaves warps *between* task
layers), and except what ``exclude=`` names. The output layers are found by

1. ``example_input=``: one forward of the model on it, with hooks on the task layers and the
   autograd graph of the output: an output layer is a task layer whose output reaches the
   model's output without passing through another task layer (so every head of a multi-head
   model counts). Task layers that do not run on the example are not warped;
2. else the structure, where it fixes the call order: ``nn.Sequential`` children run in
   registration order, so in a chain of ``nn.Sequential`` containers the last task layer is
   the output layer;
3. else ``exclude=`` is taken to name them.

Otherwise (a hand-written ``forward`` decides the order, and neither ``example_input`` nor
``exclude`` is given) :func:`default_targets` raises a ``ValueError`` that says how to choose,
instead of guessing from registration order.
"""

from __future__ import annotations

import collections.abc
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.utils.rnn import PackedSequence

__all__ = [
    "TASK_LAYERS",
    "Predicate",
    "Selector",
    "select",
    "within",
    "task_layers",
    "default_targets",
    "traced_output_layers",
]

Predicate = Callable[[str, nn.Module], bool]
Selector = str | Iterable[str] | type | tuple[type, ...] | Predicate

#: The task layers the default selection warps after (all but the output layers).
TASK_LAYERS: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.RNNBase)
_PATTERN_CHARS = frozenset("*?[")


def type_names(model: nn.Module) -> str:
    return ", ".join(sorted({type(m).__name__ for m in model.modules()}))


def submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n]  # the root is never selected


def is_types(arg: object) -> TypeGuard[type | tuple[type, ...]]:
    return isinstance(arg, type) or (isinstance(arg, tuple) and len(arg) > 0 and all(isinstance(t, type) for t in arg))


def within(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or inside it (the root's prefix is '')."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _names(arg: object) -> list[str] | None:
    """``arg`` as a list of names/patterns, or None if it is not a str / iterable of str."""
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, nn.Module) or is_types(arg) or not isinstance(arg, collections.abc.Iterable):
        return None
    names = list(arg)
    return names if all(isinstance(n, str) for n in names) else None


def _match_names(model: nn.Module, names: list[str], argname: str, arg: object) -> list[str]:
    known = [n for n, _ in submodules(model)]
    chosen: set[str] = set()
    missing = []
    for entry in names:
        if _PATTERN_CHARS & set(entry):
            hits = [n for n in known if fnmatch.fnmatchcase(n, entry)]
        else:
            hits = [entry] if entry in known else []
        if not hits:
            missing.append(entry)
        chosen.update(hits)
    if missing or not names:
        raise ValueError(
            f"{argname}={arg!r}: no submodule named or matching {missing or names} in "
            f"{type(model).__name__} (names are e.g. {known[:12]}); "
            f"the model has modules of types: {type_names(model)}"
        )
    return [n for n in known if n in chosen]


def select(model: nn.Module, arg: object, argname: str) -> list[str]:
    """Qualified names of the submodules selected by ``arg`` (see the module docstring), in
    module-tree order. Raises ``TypeError`` for a malformed selector and ``ValueError`` when
    it (or one of its names) matches nothing."""
    names = None if is_types(arg) else _names(arg)
    if names is not None:
        return _match_names(model, names, argname, arg)
    if is_types(arg):
        chosen = [n for n, m in submodules(model) if isinstance(m, arg)]
    elif callable(arg) and not isinstance(arg, nn.Module):
        chosen = [n for n, m in submodules(model) if arg(n, m)]
    else:
        raise TypeError(
            f"{argname} must be a module type, a tuple of types, a qualified module name or glob "
            f"pattern (or an iterable of them), or a predicate (qualified_name, module) -> bool, got {arg!r}"
        )
    if not chosen:
        raise ValueError(
            f"{argname}={arg!r} matched no submodule of {type(model).__name__}; "
            f"the model has modules of types: {type_names(model)}"
        )
    return chosen


def task_layers(model: nn.Module) -> list[str]:
    """The default selection's candidates, in registration order."""
    # MultiheadAttention never calls its out_proj as a module, so a hook would never fire.
    skip = nn.modules.linear.NonDynamicallyQuantizableLinear
    return [n for n, m in submodules(model) if isinstance(m, TASK_LAYERS) and not isinstance(m, skip)]


def _structural_output_layer(model: nn.Module, names: list[str]) -> str | None:
    """The last of ``names`` to run, where the module structure fixes it: the children of an
    ``nn.Sequential`` run in registration order, so follow its last child holding a candidate;
    a subtree holding a single candidate runs it last. None where a hand-written ``forward``
    decides the order."""
    module, prefix = model, ""
    while True:
        inside = [n for n in names if within(n, prefix)]
        if len(inside) == 1:
            return inside[0]
        if not isinstance(module, nn.Sequential):
            return None
        for key in reversed(list(module._modules)):
            child = f"{prefix}.{key}" if prefix else key
            if module._modules[key] is not None and any(within(n, child) for n in inside):
                break
        module, prefix = module._modules[key], child


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in a (nested) module output: tuples, lists, dicts, PackedSequence."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, PackedSequence):
        yield value.data
    elif isinstance(value, collections.abc.Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif hasattr(value, "__dataclass_fields__"):  # e.g. Hugging Face ModelOutput
        for key in value.__dataclass_fields__:
            yield from _tensors(getattr(value, key, None))


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, collections.abc.Mapping):
        return model(**example_input)
    return model(example_input)


def traced_output_layers(
    model: nn.Module, names: list[str], example_input: Any
) -> tuple[list[str], set[str], set[str]]:
    """Run ``model`` once on ``example_input`` and return (the candidates ``names`` that ran,
    in call order; the output layers among them; those whose output never reaches the model's
    output, for an RNN/LSTM/GRU its output sequence, where a warp would act: a model that
    reads only ``h_n``).

    Nothing observable changes: buffers (BatchNorm statistics), ``requires_grad`` flags and
    the global RNG state (dropout) are restored, and the hooks removed. No backward runs.
    """
    called: list[str] = []
    marks: dict[tuple[Any, int], str] = {}  # (autograd node, which of its outputs) -> module

    def recorder(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name not in called:
                called.append(name)
            if isinstance(module, nn.RNNBase) and isinstance(output, tuple):
                output = output[0]  # the sequence the warp acts on; h_n comes out of the same node
            for t in _tensors(output):
                if t.grad_fn is not None:
                    marks.setdefault((t.grad_fn, t.output_nr), name)

        return hook

    params = [p for p in model.parameters() if p.is_floating_point() or p.is_complex()]
    flags = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    tensors = params + [b for b, _ in buffers] + list(_tensors(example_input))
    cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    handles = [model.get_submodule(n).register_forward_hook(recorder(n)) for n in names]
    try:
        for p in params:  # every task layer's output gets a grad_fn, so the graph shows the data flow
            p.requires_grad_(True)
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            try:
                output = _call(model, example_input)
            except Exception as err:
                raise ValueError(f"example_input: {type(model).__name__}'s forward failed on it: {err}") from err
        # Walk the autograd graph back from the outputs: the first task layer on each path is an
        # output layer; the walk goes on past it to see which task layers reach the output at all.
        found: set[str] = set()
        reached: set[str] = set()
        seen: set[Any] = set()
        stack: list[tuple[Node | None, int, bool]] = [
            (t.grad_fn, t.output_nr, True) for t in _tensors(output) if t.grad_fn is not None
        ]
        while stack:
            node, nr, first = stack.pop()
            if node is None:
                continue
            name = marks.get((node, nr))
            if name is not None:
                reached.add(name)
                if first:
                    found.add(name)
                first = False
            if (node, first) in seen:
                continue
            seen.add((node, first))
            stack.extend((fn, index, first) for fn, index in node.next_functions)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if not found and called:  # the output does not depend on them through autograd (argmax, detach)
        return called, {called[-1]}, set()
    return called, found, set(called) - reached


def default_targets(model: nn.Module, example_input: Any = None, exclude: Selector | None = None) -> list[str]:
    """The modules the default selection warps after: every task layer but the output layers
    and ``exclude`` (see the module docstring), in registration order."""
    names = task_layers(model)
    excluded = select(model, exclude, "exclude") if exclude is not None else []
    unreached: set[str] = set()
    outputs: list[str] = []  # in call order
    if example_input is not None:
        called, found, unreached = traced_output_layers(model, names, example_input)
        outputs = [n for n in called if n in found]
        kept = [n for n in names if n in called and n not in found and n not in unreached]
    else:
        last = _structural_output_layer(model, names) if len(names) > 1 else (names[0] if names else None)
        if last is None and exclude is None:
            raise ValueError(
                f"cannot tell which task layer of {type(model).__name__} is its output layer: its forward "
                f"decides the order in which {names} run, and the output layer must not be warped. "
                f"Pass example_input=<a batch> to find it by running one forward "
                f"(warp(model, example_input=x)), exclude=<its name> to name it (one of {names}; "
                f"the last registered is not necessarily the last called), or where=<selector> to "
                f"choose the modules to warp"
            )
        kept = [n for n in names if n != last]  # last None: `exclude` names the output layers
    targets = [n for n in kept if not any(within(n, e) for e in excluded)]
    sequences = sorted(n for n in unreached if isinstance(model.get_submodule(n), nn.RNNBase))
    if not targets and sequences:
        raise ValueError(
            f"the output sequence of {sequences} does not reach {type(model).__name__}'s output (its "
            "forward reads only the hidden state h_n), so a warp on it would have no effect. Read the "
            "sequence instead (out[:, -1] equals h_n[-1] for a unidirectional RNN), or pass where= to "
            "choose the modules to warp"
        )
    if not targets and len(outputs) > 1:
        raise ValueError(
            f"example_input: the outputs of {outputs} all reach {type(model).__name__}'s output without "
            "passing through another of them, so each counts as an output layer and none is warped (a "
            "model that also returns hidden states does this). Name the real output layer(s) instead, "
            f"without example_input: warp(model, exclude={outputs[-1]!r}) if it is the last one called, "
            "or pass where=<selector>"
        )
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no Conv1d/2d/3d, Linear or RNN/LSTM/GRU module besides its "
            f"output layer{' and exclude=' + repr(exclude) if exclude is not None else ''}, so nothing is "
            f"warped by default; pass `where` or `designate`. The model has modules of types: {type_names(model)}"
        )
    return targets
