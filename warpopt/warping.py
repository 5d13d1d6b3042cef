"""Embedding WarpGrad warp layers in an arbitrary ``nn.Module`` (Appendix A).

:func:`warp` turns a task learner into a warped one, in place, by

* **model augmentation**: inserting identity-initialised warp layers after selected
  modules, ``h = omega_L o h_L o ... o omega_1 o h_1`` (Sec. 2.2, Eq. 2); and/or
* **model partitioning**: designating existing submodules as warp layers.

It then partitions the parameters into *warp* parameters ``phi`` (held fixed during
task adaptation, meta-learned) and *adapt* parameters ``theta`` (everything else,
including :class:`~warpopt.layers.TaskAdaptable` submodules of warp layers).

An inserted warp layer is a child named ``warp`` of its host module, applied by a
forward hook on the host, so the original ``state_dict`` keys are unchanged and
:func:`unwarp` can undo everything.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, SupportsIndex, TypeGuard, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils.hooks import RemovableHandle

from .layers import TaskAdaptable, default_warp_layer
from .selection import Selector, default_targets, select, within

__all__ = [
    "warp", "unwarp", "is_warped", "warp_layers", "WarpedModule", "WarpSpec", "InsertedWarp",
    "named_adapt_parameters", "adapt_parameters", "named_warp_parameters", "warp_parameters",
    "named_adapt_buffers", "adapt_buffers", "named_warp_buffers", "warp_buffers",
]  # fmt: skip

Where = Selector | None
Designate = Selector | None
LayerFactory = Callable[[int, int], nn.Module]

_WARP_ATTR = "warp"
_SPEC_ATTR = "_warpopt_spec"

_ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink,
    nn.Softshrink,
)  # fmt: skip
# Siblings that may follow a task layer in an nn.Sequential without ending its block.
_BLOCK_FOLLOWERS: tuple[type, ...] = _ACTIVATIONS + (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
    nn.GroupNorm, nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._LPPoolNd,
    nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.modules.dropout._DropoutNd, nn.Identity,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())  # fmt: skip
_DUMMY_SPATIAL = {0: (), 1: (6,), 2: (6, 6), 3: (4, 4, 4)}
_T = TypeVar("_T", bound=Tensor)


@dataclasses.dataclass(frozen=True)
class InsertedWarp:
    """An inserted warp layer ``<host>.warp``, applied by forward hook ``hook_id`` on
    ``host`` and placed for the selected module ``target`` (qualified names)."""

    target: str
    host: str
    hook_id: int


@dataclasses.dataclass
class WarpSpec:
    """What :func:`warp` did to a model; stored on it as ``_warpopt_spec``."""

    inserted: list[InsertedWarp]
    designated: list[str]

    def warp_layer_names(self) -> list[str]:
        return [_join(w.host, _WARP_ATTR) for w in self.inserted] + list(self.designated)


class _ApplyWarp:
    """Forward hook returning ``host.<attr>(output)``.

    Looking the layer up by name, instead of closing over it, keeps warped models
    picklable and makes a deep copy's hook call the copy's own warp layer."""

    def __init__(self, attr: str = _WARP_ATTR) -> None:
        self.attr = attr

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        # `Any`, as in torch's forward-hook type: the output is whatever the host returns.
        return getattr(module, self.attr)(output)


class _ApplyWarpToSequence(_ApplyWarp):
    """Forward hook of a recurrent host (``nn.RNN``/``LSTM``/``GRU``): warps the output
    sequence, returns the hidden state untouched.

    The warp layer always sees the sequence batch first, ``(N, L, C)``, whatever the host's
    ``batch_first`` (an unbatched ``(L, C)`` gets N = 1; a ``PackedSequence`` is padded and
    packed again), so per-position layers and sequence layers (``LSTMWarp``) both apply."""

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> tuple[Any, ...]:
        sequence, rest = output[0], tuple(output[1:])
        layer = getattr(module, self.attr)
        if isinstance(sequence, PackedSequence):
            padded, lengths = pad_packed_sequence(sequence, batch_first=True)
            packed = pack_padded_sequence(layer(padded), lengths, batch_first=True, enforce_sorted=False)
            return (packed, *rest)
        if sequence.dim() == 2:  # unbatched (L, C)
            return (layer(sequence.unsqueeze(0)).squeeze(0), *rest)
        if module.batch_first:
            return (layer(sequence), *rest)
        warped = layer(sequence.transpose(0, 1)).transpose(0, 1)
        return (warped.contiguous() if sequence.is_contiguous() else warped, *rest)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------- class swap


def _rebuild_warped(original_cls: type) -> nn.Module:
    """Unpickling constructor: an empty ``Warped<original_cls>`` awaiting its state."""
    return object.__new__(_warped_class(original_cls))


# A type checker sees the mixin as an nn.Module (it only ever ends up in front of one in the
# MRO of a `Warped<ClassName>`); at run time it is a plain mixin, so the MRO is unchanged.
if TYPE_CHECKING:
    _MixinBase = nn.Module
else:
    _MixinBase = object


class WarpedModule(_MixinBase):
    """Mixin of the ``Warped<ClassName>`` classes :func:`warp` swaps models to; its
    methods are the module-level functions of the same names."""

    _warpopt_original_class: type

    def warp_layers(self) -> dict[str, nn.Module]:
        return warp_layers(self)

    def named_adapt_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return named_adapt_parameters(self)

    def adapt_parameters(self) -> Iterator[nn.Parameter]:
        return adapt_parameters(self)

    def named_warp_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return named_warp_parameters(self)

    def warp_parameters(self) -> Iterator[nn.Parameter]:
        return warp_parameters(self)

    def named_adapt_buffers(self) -> Iterator[tuple[str, Tensor]]:
        return named_adapt_buffers(self)

    def adapt_buffers(self) -> Iterator[Tensor]:
        return adapt_buffers(self)

    def named_warp_buffers(self) -> Iterator[tuple[str, Tensor]]:
        return named_warp_buffers(self)

    def warp_buffers(self) -> Iterator[Tensor]:
        return warp_buffers(self)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        # The dynamic class is not importable by name: rebuild it from the original one.
        return _rebuild_warped, (type(self)._warpopt_original_class,), self.__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _refresh_hook_ids(self)


_WARPED_CLASSES: dict[type, type] = {}


def _warped_class(cls: type) -> type:
    if cls not in _WARPED_CLASSES:
        attrs = {"_warpopt_original_class": cls, "__qualname__": f"Warped{cls.__qualname__}"}
        _WARPED_CLASSES[cls] = type(f"Warped{cls.__name__}", (WarpedModule, cls), attrs)
    return _WARPED_CLASSES[cls]


def _refresh_hook_ids(model: nn.Module) -> None:
    """Give unpickled warp hooks ids from this process's hook counter: hooks registered
    later in this process could otherwise reuse (and overwrite) the saved ids."""
    spec = model.__dict__.get(_SPEC_ATTR)
    if spec is None:
        return
    for i, entry in enumerate(spec.inserted):
        hooks = model.get_submodule(entry.host)._forward_hooks
        if isinstance(hooks.get(entry.hook_id), _ApplyWarp):
            new_id = RemovableHandle(collections.OrderedDict()).id
            items = [(new_id if k == entry.hook_id else k, h) for k, h in hooks.items()]
            hooks.clear()
            hooks.update(items)  # in place and in order: hooks run in insertion order
            spec.inserted[i] = dataclasses.replace(entry, hook_id=new_id)


# ---------------------------------------------------------------------------- selection


def _host_for(model: nn.Module, name: str, counts: collections.Counter) -> str:
    """Where the warp for selected module ``name`` goes: after the block's non-linearity,
    i.e. the last activation in the run of norm/pool/activation/dropout siblings that
    follows the module in its ``nn.Sequential``; else after the module itself. A
    selected ``nn.Sequential`` block is warped after its last (leaf) child."""
    parent_name, _, child = name.rpartition(".")
    parent, host = model.get_submodule(parent_name), name
    if isinstance(model.get_submodule(name), nn.RNNBase):
        return name  # its tuple output cannot feed an activation: warp the sequence itself
    if isinstance(parent, nn.Sequential):
        keys = list(parent._modules)
        for key in keys[keys.index(child) + 1 :]:
            if not isinstance(parent._modules[key], _BLOCK_FOLLOWERS):
                break
            if isinstance(parent._modules[key], _ACTIVATIONS):
                host = _join(parent_name, key)
    module = model.get_submodule(host)
    while isinstance(module, nn.Sequential) and len(module) > 0:
        key = list(module._modules)[-1]
        host, module = _join(host, key), module._modules[key]
    # A shared instance (e.g. one ReLU reused) runs in several places: don't warp them all.
    return name if counts[id(module)] > 1 else host


def _infer_shape(name: str, module: nn.Module) -> tuple[int, int]:
    """``(channels, spatial_dims)`` of a selected module's output, read off the module or,
    for a block, off the last conv / linear inside it."""
    for m in [module, *list(module.modules())[::-1]]:
        if isinstance(m, nn.RNNBase):  # features of the output sequence
            return (m.proj_size or m.hidden_size) * (2 if m.bidirectional else 1), 0
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.out_channels, len(m.kernel_size)
        out_features = getattr(m, "out_features", None)
        if isinstance(out_features, int):
            return out_features, 0
    raise ValueError(
        f"cannot infer the output channels of '{name}' ({type(module).__name__}): select "
        f"Conv/Linear/RNN modules (out_channels / out_features / hidden_size) or blocks containing one"
    )


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _build_layer(layer: LayerFactory, name: str, module: nn.Module) -> nn.Module:
    """Build the warp layer for selected module ``name`` and check it preserves shapes."""
    channels, spatial_dims = _infer_shape(name, module)
    sequence = isinstance(module, nn.RNNBase)
    built = layer(channels, spatial_dims)
    if not isinstance(built, nn.Module):
        raise TypeError(f"warp layer factory {layer!r} returned {type(built).__name__} for '{name}', not an nn.Module")
    device, dtype = _device_dtype(module)
    built.to(device=device, dtype=dtype)
    # A recurrent host's warp sees (N, L, C); L != C so a layer reading dim 1 as channels fails here.
    shape = (2, channels + 1, channels) if sequence else (2, channels) + _DUMMY_SPATIAL[spatial_dims]
    # A private generator: checking must not consume the user's global RNG stream.
    dummy = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    modes = [(m, m.training) for m in built.modules()]
    try:
        with torch.no_grad():
            out = built.eval()(dummy)
    except Exception as err:
        hint = " (a recurrent host's warp gets its output sequence as (batch, time, features))" if sequence else ""
        raise ValueError(f"warp layer for '{name}' failed on a dummy input of shape {shape}{hint}: {err}") from err
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(out, Tensor) or out.shape != dummy.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"warp layer {type(built).__name__} for '{name}' maps an input of shape {shape} "
            f"to {got}; a warp layer must preserve the shape of its input"
        )
    return built


# ---------------------------------------------------------------------------- public API


def warp(
    model: nn.Module,
    where: Where = None,
    layer: LayerFactory = default_warp_layer,
    *,
    designate: Designate = None,
    example_input: Any = None,
    exclude: Selector | None = None,
) -> nn.Module:
    """Warp ``model`` in place (Appendix A) and return it.

    Selectors (``where``, ``designate``, ``exclude``) are a module type or tuple of types,
    a predicate ``(qualified_name, module) -> bool``, a qualified module name, a glob
    pattern over qualified names (``"blocks.*.fc1"``) or an iterable of names/patterns
    (:mod:`warpopt.selection`). The root module is never selected.

    Args:
        model: any ``nn.Module``; modified in place, as by ``torch.nn.utils.parametrize``.
        where: modules to insert a warp layer after (*model augmentation*), or ``None``:
            every Conv1d/2d/3d, Linear and RNN/LSTM/GRU except the output layer(s) and
            ``exclude`` if ``designate`` is ``None``, no insertion otherwise. The output
            layers are found by one forward on ``example_input``, else, where the structure
            fixes the call order (``nn.Sequential`` chains), they are the last such module,
            else ``exclude`` must name them; otherwise ``ValueError`` says how to choose. In an
            ``nn.Sequential`` the warp goes after the last activation of the
            norm/pool/activation/dropout siblings following the module. On an RNN/LSTM/GRU
            the warp acts on the output sequence (as ``(batch, time, features)``) and the
            hidden state passes untouched.
        layer: warp layer factory ``layer(channels, spatial_dims) -> nn.Module``
            (:mod:`warpopt.layers`); ``channels`` is the module's ``out_channels`` /
            ``out_features`` / RNN output features, ``spatial_dims`` follows its type
            (Linear and RNN 0, ConvNd N). Layers are built on the module's device and dtype.
        designate: existing submodules to make warp layers (*model partitioning*).
        example_input: a batch for one traced forward that finds the output layers of the
            default selection (a tuple is passed as positional arguments, a dict as keyword
            arguments). Nothing observable changes: buffers, ``requires_grad`` flags and the
            global RNG state are restored.
        exclude: modules never to warp (and everything inside them), on top of the output
            layers; for a hand-written model without ``example_input`` it must name them.

    Returns:
        ``model``, now a ``Warped<ClassName>`` with ``warp_parameters()``,
        ``adapt_parameters()`` etc.; with identity-initialised layers its function is
        unchanged.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; malformed selectors or ``layer``; the
            factory returns a non-Module.
        ValueError: a selector (or one of its names) matches nothing; the output layer
            cannot be told from the structure; ``example_input`` fails or comes with
            ``where``/``designate`` alone; the model is already warped; a warp layer
            changes the shape of its input; a host already has an attribute ``warp``. The
            model is left untouched when raising.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"warp() expects an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if is_warped(module):
            which = f"its submodule '{name}' is" if name else "it is"
            raise ValueError(
                f"{type(model).__name__} cannot be warped twice ({which} warped); call warpopt.unwarp first"
            )
    if not callable(layer):
        raise TypeError(f"layer must be a factory (channels, spatial_dims) -> nn.Module, got {layer!r}")
    default = where is None and designate is None
    if example_input is not None and not default:
        raise ValueError(
            "example_input only locates the output layer for the default selection; with where= "
            "or designate= you choose the modules yourself: drop example_input"
        )

    # Validate everything and build every layer before the model is touched.
    if where is not None:
        excluded = select(model, exclude, "exclude") if exclude is not None else []
        targets = [t for t in select(model, where, "where") if not any(within(t, e) for e in excluded)]
        if not targets:
            raise ValueError(f"where={where!r} selects only modules that exclude={exclude!r} removes")
    elif default:
        targets = default_targets(model, example_input, exclude)
    else:
        if exclude is not None:
            raise ValueError(
                "exclude filters insertion (where= or the default selection); with designate= "
                "alone nothing is inserted: drop exclude"
            )
        targets = []
    designated = select(model, designate, "designate") if designate is not None else []
    counts = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    hosts = [_host_for(model, name, counts) for name in targets]
    for host, target in zip(hosts, targets):
        if hosts.count(host) > 1:
            clash = [t for t, h in zip(targets, hosts) if h == host]
            raise ValueError(f"selected modules {clash} would all be warped after '{host}'; select one of them")
        if hasattr(model.get_submodule(host), _WARP_ATTR):
            raise ValueError(
                f"cannot insert a warp layer after '{host}' (for '{target}'): its "
                f"{type(model.get_submodule(host)).__name__} already has an attribute '{_WARP_ATTR}'"
            )
    layers = [_build_layer(layer, t, model.get_submodule(t)) for t in targets]

    inserted = []
    for target, host_name, built in zip(targets, hosts, layers):
        host_module = model.get_submodule(host_name)
        host_module.add_module(_WARP_ATTR, built.train(host_module.training))
        seq = isinstance(host_module, nn.RNNBase)
        hook = _ApplyWarpToSequence(_WARP_ATTR) if seq else _ApplyWarp(_WARP_ATTR)
        handle = host_module.register_forward_hook(hook)
        inserted.append(InsertedWarp(target=target, host=host_name, hook_id=handle.id))
    setattr(model, _SPEC_ATTR, WarpSpec(inserted=inserted, designated=designated))
    model.__class__ = _warped_class(type(model))
    return model


def unwarp(model: nn.Module) -> nn.Module:
    """Undo :func:`warp` in place: remove the inserted warp layers and their hooks,
    forget the designation, restore the original class. Returns ``model``."""
    spec = _spec(model)
    for entry in spec.inserted:
        host = model.get_submodule(entry.host)
        ours = [k for k, h in host._forward_hooks.items() if isinstance(h, _ApplyWarp)]
        for key in [entry.hook_id] if entry.hook_id in ours else ours:  # ids may have been reset
            del host._forward_hooks[key]
        delattr(host, _WARP_ATTR)
    delattr(model, _SPEC_ATTR)
    model.__class__ = cast(type[WarpedModule], type(model))._warpopt_original_class  # _spec checked it
    return model


def is_warped(model: nn.Module) -> TypeGuard[WarpedModule]:
    """Whether :func:`warp` was applied to ``model`` (and not undone); narrows its type to
    :class:`WarpedModule` (``warp_parameters()`` etc.) for a type checker."""
    return isinstance(model, WarpedModule)


def _spec(model: nn.Module) -> WarpSpec:
    if not is_warped(model):
        raise ValueError(f"{type(model).__name__} is not warped; call warpopt.warp(model) first")
    return getattr(model, _SPEC_ATTR)


def warp_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> warp layer (inserted or designated), in module-tree order."""
    names = set(_spec(model).warp_layer_names())
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if n in names}


def _is_under(name: str, prefixes: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def _split(model: nn.Module, named: Iterator[tuple[str, _T]], want_warp: bool) -> Iterator[tuple[str, _T]]:
    """Filter ``named`` tensors to the warp ones (under a warp layer, but not under a
    TaskAdaptable submodule of one) or to the adapt ones. Computed from names on each
    call, so parameters replaced after warping are classified correctly."""
    layers = warp_layers(model)
    warp_prefixes = set(layers)
    task_adaptable = {
        _join(prefix, sub) if sub else prefix
        for prefix, layer in layers.items()
        for sub, m in layer.named_modules()
        if isinstance(m, TaskAdaptable)
    }
    return (
        (n, t) for n, t in named
        if (_is_under(n, warp_prefixes) and not _is_under(n, task_adaptable)) == want_warp
    )  # fmt: skip


def named_warp_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Warp parameters ``phi``, in ``model.named_parameters()`` order."""
    return _split(model, model.named_parameters(), True)


def named_adapt_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Adapt (task) parameters ``theta``: all parameters that are not warp parameters."""
    return _split(model, model.named_parameters(), False)


def named_warp_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Buffers of warp layers (e.g. BN statistics), in ``model.named_buffers()`` order."""
    return _split(model, model.named_buffers(), True)


def named_adapt_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """All buffers that are not warp buffers."""
    return _split(model, model.named_buffers(), False)


def warp_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for _, p in named_warp_parameters(model))


def adapt_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for _, p in named_adapt_parameters(model))


def warp_buffers(model: nn.Module) -> Iterator[Tensor]:
    return (b for _, b in named_warp_buffers(model))


def adapt_buffers(model: nn.Module) -> Iterator[Tensor]:
    return (b for _, b in named_adapt_buffers(model))
