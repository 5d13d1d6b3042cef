"""warp() / unwarp() on random architectures: function preserved, exact partition,
serialisation round trips, placement rules, and validation before mutation."""

import copy
import functools
import io
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import warpopt.warping as warping
from warpopt.layers import (
    ConvBNWarp,
    ConvWarp,
    LinearWarp,
    MLPResidualWarp,
    ResidualWarp,
    ScaleWarp,
    TaskFiLM,
    TwoLayerResidualWarp,
)
from warpopt.warping import is_warped, unwarp, warp


# ----------------------------------------------------------------------------- architectures


class HandWritten(nn.Module):
    """Registration order differs from call order; uses functional activations."""

    def __init__(self, c_in: int, width: int, n_out: int) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, n_out)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class Residual(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


class Arch(NamedTuple):
    kind: str
    widths: tuple
    variants: tuple
    seed: int
    relu_hosts: bool  # every default warp host is preceded by a ReLU


BLOCKS = {  # block layouts after the conv
    "omniglot": ("pool", "bn", "relu"),
    "bn-relu-pool": ("bn", "relu", "pool"),
    "relu": ("relu",),
    "bn-relu-dropout": ("bn", "relu", "dropout"),
}


def _block(dims: int, c_in: int, c_out: int, layout: tuple) -> list:
    conv, bn, pool = {1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d), 2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)}[dims]
    make = {"pool": lambda: pool(2), "bn": lambda: bn(c_out), "relu": nn.ReLU, "dropout": lambda: nn.Dropout(0.3)}
    return [conv(c_in, c_out, 3, padding=1)] + [make[k]() for k in layout]


def build(arch: Arch) -> tuple[nn.Module, torch.Tensor]:
    """Deterministic model and input batch for an architecture description."""
    torch.manual_seed(arch.seed)
    w, n_out = arch.widths, 3
    if arch.kind in ("conv1d", "conv2d"):
        dims = 1 if arch.kind == "conv1d" else 2
        layers, size = [], 8
        for c_in, c_out, layout in zip((2,) + w[:-1], w, arch.variants):
            layers += _block(dims, c_in, c_out, BLOCKS[layout])
            size //= 2 if "pool" in BLOCKS[layout] else 1
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(w[-1] * size**dims, n_out))
        x = torch.randn((3, 2) + (8,) * dims)
    elif arch.kind == "mlp":
        layers = []
        for d_in, d_out, (norm, act, drop) in zip((5,) + w[:-1], w, arch.variants):
            layers.append(nn.Linear(d_in, d_out))
            layers += {"bn": [nn.BatchNorm1d(d_out)], "ln": [nn.LayerNorm(d_out)], "none": []}[norm]
            layers.append({"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[act]())
            layers += [nn.Dropout(0.2)] if drop else []
        model = nn.Sequential(*layers, nn.Linear(w[-1], n_out))
        x = torch.randn(4, 5)
    elif arch.kind == "handwritten":
        model, x = HandWritten(2, w[0], n_out), torch.randn(3, 2, 8, 8)
    elif arch.kind == "nested":
        model = nn.Sequential(
            nn.Sequential(nn.Conv2d(2, w[0], 3, padding=1), nn.BatchNorm2d(w[0]), nn.ReLU()),
            nn.Sequential(nn.Conv2d(w[0], w[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Flatten(),
            nn.Linear(w[1] * 16, n_out),
        )
        x = torch.randn(3, 2, 8, 8)
    elif arch.kind == "residual":
        c = w[0]
        block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        model = nn.Sequential(
            nn.Conv2d(2, c, 3, padding=1), nn.ReLU(), Residual(block), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_out),
        )  # fmt: skip
        x = torch.randn(3, 2, 6, 6)
    else:
        raise AssertionError(arch.kind)
    return model, x


@st.composite
def architectures(draw):
    kind = draw(st.sampled_from(["conv1d", "conv2d", "mlp", "handwritten", "nested", "residual"]))
    seed = draw(st.integers(0, 2**20))
    depth = draw(st.integers(1, 3))
    widths = tuple(draw(st.lists(st.integers(1, 4), min_size=depth, max_size=depth)))
    if kind in ("conv1d", "conv2d"):
        variants = tuple(draw(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=depth, max_size=depth)))
        return Arch(kind, widths, variants, seed, True)
    if kind == "mlp":
        step = st.tuples(st.sampled_from(["bn", "ln", "none"]), st.sampled_from(["relu", "tanh", "gelu"]), st.booleans())
        variants = tuple(draw(st.lists(step, min_size=depth, max_size=depth)))
        return Arch(kind, widths, variants, seed, all(act == "relu" for _, act, _ in variants))
    widths = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=2)))
    return Arch(kind, widths, (), seed, kind == "nested")


EXACT_IN_TRAIN = {
    "default": None,
    "conv1": functools.partial(ConvWarp, kernel_size=1),
    "linear": LinearWarp,
    "scale": ScaleWarp,
    "two-layer": functools.partial(TwoLayerResidualWarp, task_film=True),
    "mlp": MLPResidualWarp,
}
EVAL_ONLY = {"conv-bn": ConvBNWarp}
AFTER_RELU = {"residual": ResidualWarp, "conv-bn-relu": functools.partial(ConvBNWarp, relu=True)}


def run(model, x, train: bool):
    model.train(train)
    torch.manual_seed(0)  # same dropout masks for every model
    with torch.no_grad():
        return model(x)


def warped(arch: Arch, factory=None, **kwargs):
    model, x = build(arch)
    if arch.kind == "handwritten":  # its forward decides the call order: find the output layer by one forward
        kwargs.setdefault("example_input", x)
    return (warp(model, **kwargs) if factory is None else warp(model, layer=factory, **kwargs)), x


def perturb_warp(model):
    with torch.no_grad():
        for p in model.warp_parameters():
            p.add_(0.1 * torch.randn_like(p))


def assert_same(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- properties


@settings(max_examples=50, deadline=None)
@given(architectures(), st.sampled_from(sorted(EXACT_IN_TRAIN) + sorted(EVAL_ONLY) + sorted(AFTER_RELU)))
def test_warp_preserves_outputs_in_train_and_eval_mode(arch, layer_name):
    factory = {**EXACT_IN_TRAIN, **EVAL_ONLY, **AFTER_RELU}[layer_name]
    if layer_name in AFTER_RELU and not arch.relu_hosts:
        factory = None
    reference, x = build(arch)
    model, _ = warped(arch, factory)
    assert is_warped(model) and type(model).__name__ == f"Warped{type(reference).__name__}"
    assert isinstance(model, type(reference))
    # eval first: a train-mode forward moves the BN statistics of BN-variant warps
    assert_same(run(model, x, False), run(reference, x, False))
    if layer_name not in EVAL_ONLY and not (layer_name == "conv-bn-relu"):
        assert_same(run(model, x, True), run(reference, x, True))
        assert_same(run(model, x, False), run(reference, x, False))


@settings(max_examples=30, deadline=None)
@given(architectures(), st.sampled_from(sorted(EXACT_IN_TRAIN)))
def test_partition_is_exact_and_disjoint(arch, layer_name):
    model, _ = warped(arch, EXACT_IN_TRAIN[layer_name])
    for kind in ("parameters", "buffers"):
        everything = list(getattr(model, f"named_{kind}")())
        adapt = list(getattr(model, f"named_adapt_{kind}")())
        warp_ = list(getattr(model, f"named_warp_{kind}")())
        assert {id(t) for _, t in adapt}.isdisjoint({id(t) for _, t in warp_})
        assert {id(t) for _, t in adapt} | {id(t) for _, t in warp_} == {id(t) for _, t in everything}
        names = [n for n, _ in everything]
        assert sorted(n for n, _ in adapt + warp_) == sorted(names)
        warp_names = {n for n, _ in warp_}
        assert [n for n in names if n in warp_names] == [n for n, _ in warp_]  # order kept
        assert [n for n in names if n not in warp_names] == [n for n, _ in adapt]
        # module-level functions agree with the methods
        assert [n for n, _ in getattr(warping, f"named_warp_{kind}")(model)] == [n for n, _ in warp_]
        assert list(getattr(model, f"warp_{kind}")()) == [t for _, t in warp_]
        assert list(getattr(model, f"adapt_{kind}")()) == [t for _, t in adapt]
    layers = model.warp_layers()
    assert layers and all(name.endswith(".warp") for name in layers)
    film = {id(p) for m in layers.values() for f in m.modules() if isinstance(f, TaskFiLM) for p in f.parameters()}
    expected = {id(p) for m in layers.values() for p in m.parameters()} - film
    assert {id(p) for p in model.warp_parameters()} == expected
    assert film <= {id(p) for p in model.adapt_parameters()}
    # the original model's parameters are exactly the adapt parameters (apart from TA FiLM)
    original, _ = build(arch)
    assert [n for n, _ in model.named_adapt_parameters() if ".warp." not in n] == [
        n for n, _ in original.named_parameters()
    ]


@settings(max_examples=20, deadline=None)
@given(architectures())
def test_serialisation_round_trips(arch):
    model, x = warped(arch)
    perturb_warp(model)  # make the round trips meaningful
    expected = run(model, x, False)

    fresh, _ = warped(arch._replace(seed=arch.seed + 1))
    fresh.load_state_dict(model.state_dict())
    assert_same(run(fresh, x, False), expected)

    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and list(clone.warp_layers()) == list(model.warp_layers())
    assert_same(run(clone, x, False), expected)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.parameters(), model.parameters()))
    with torch.no_grad():
        next(clone.warp_parameters()).add_(1.0)
    assert_same(run(model, x, False), expected)
    assert [n for n, _ in clone.named_warp_parameters()] == [n for n, _ in model.named_warp_parameters()]

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert is_warped(loaded) and type(loaded) is type(model)
    assert_same(run(loaded, x, False), expected)
    assert [n for n, _ in loaded.named_warp_parameters()] == [n for n, _ in model.named_warp_parameters()]
    original, _ = build(arch)
    assert list(unwarp(loaded).state_dict()) == list(original.state_dict())

    double = copy.deepcopy(model).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in double.warp_parameters())
    torch.testing.assert_close(run(double, x.double(), False), expected.double(), atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(architectures())
def test_unwarp_restores_the_original_model(arch):
    reference, x = build(arch)
    model, _ = warped(arch)
    assert set(reference.state_dict()) < set(model.state_dict())
    assert all(".warp." in k for k in set(model.state_dict()) - set(reference.state_dict()))
    run(model, x, True)  # updates the task layers' BN statistics as in the reference
    run(reference, x, True)
    restored = unwarp(model)
    assert restored is model and type(model) is type(reference) and not is_warped(model)
    assert not hasattr(model, "_warpopt_spec")
    assert list(model.state_dict()) == list(reference.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(not m._forward_hooks for m in model.modules())
    assert_same(run(model, x, False), run(reference, x, False))
    warp(model, example_input=x)  # can be warped again
    assert is_warped(model)


# ------------------------------------------------------------------------------- placement


def omniglot_net():
    def block(c_in):
        return [nn.Conv2d(c_in, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU()]

    return nn.Sequential(nn.Sequential(*block(1), *block(4)), nn.Flatten(), nn.Linear(4 * 4, 5))


def test_warp_goes_after_the_block_non_linearity():
    model = warp(omniglot_net())
    assert list(model.warp_layers()) == ["0.3.warp", "0.7.warp"]
    assert "0.3.warp.weight" in model.state_dict()
    assert [(w.target, w.host) for w in model._warpopt_spec.inserted] == [("0.0", "0.3"), ("0.4", "0.7")]
    model = warp(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1)))
    assert list(model.warp_layers()) == ["2.warp"]


def test_no_activation_in_the_run_warps_the_module_itself():
    model = warp(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1)))
    assert list(model.warp_layers()) == ["0.warp"]
    model = warp(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert list(model.warp_layers()) == ["0.warp", "2.warp"]


def test_shared_activation_instance_falls_back_to_the_module():
    relu = nn.ReLU()
    model = warp(nn.Sequential(nn.Linear(3, 4), relu, nn.Linear(4, 4), relu, nn.Linear(4, 1)))
    assert list(model.warp_layers()) == ["0.warp", "2.warp"]
    assert not hasattr(relu, "warp")


def test_selected_block_is_warped_after_its_last_child():
    model, x = build(Arch("nested", (3, 2), (), 0, True))
    reference = copy.deepcopy(model)
    warp(model, where=lambda name, m: isinstance(m, nn.Sequential))
    assert list(model.warp_layers()) == ["0.2.warp", "1.2.warp"]  # after ReLU and MaxPool
    assert model.warp_layers()["0.2.warp"].weight.shape[0] == 3  # channels of the block's conv
    assert_same(run(model, x, True), run(reference, x, True))


def test_handwritten_and_residual_models_are_warped_after_the_modules():
    model = warp(HandWritten(2, 3, 4), example_input=torch.randn(3, 2, 8, 8))
    assert sorted(model.warp_layers()) == ["conv1.warp", "conv2.warp"]  # fc is the output layer
    model = warp(build(Arch("residual", (3, 3), (), 0, False))[0])
    assert list(model.warp_layers()) == ["1.warp", "2.block.2.warp", "2.block.3.warp"]


def test_where_forms_and_designation():
    model = warp(HandWritten(2, 3, 4), where=nn.Conv2d)
    assert sorted(model.warp_layers()) == ["conv1.warp", "conv2.warp"]
    model = warp(HandWritten(2, 3, 4), where=(nn.Conv2d, nn.Linear))
    assert sorted(model.warp_layers()) == ["conv1.warp", "conv2.warp", "fc.warp"]
    model = warp(HandWritten(2, 3, 4), where=lambda name, m: name == "fc", layer=LinearWarp)
    assert list(model.warp_layers()) == ["fc.warp"]
    model = warp(HandWritten(2, 3, 4), designate="conv2")
    assert list(model.warp_layers()) == ["conv2"]
    assert [n for n, _ in model.named_warp_parameters()] == ["conv2.weight", "conv2.bias"]
    assert [n for n, _ in warping.named_warp_buffers(model)] == []
    model = warp(HandWritten(2, 3, 4), designate=["bn", "conv2"])
    assert list(model.warp_layers()) == ["conv2", "bn"]
    assert [n for n, _ in model.named_warp_buffers()] == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    model = warp(HandWritten(2, 3, 4), designate=nn.BatchNorm2d)
    assert list(model.warp_layers()) == ["bn"]
    model = warp(HandWritten(2, 3, 4), designate=lambda name, m: name.startswith("conv"))
    assert list(model.warp_layers()) == ["conv2", "conv1"]


def test_warp_maml_designation_combined_with_insertion():
    """Warp-MAML: the first conv is a warp layer, warps are inserted after the others."""
    model = nn.Sequential(*[m for i in range(4) for m in (nn.Conv2d(3 if i else 1, 3, 3, padding=1), nn.ReLU())])
    model.append(nn.Flatten()).append(nn.Linear(3 * 36, 2))
    x = torch.randn(2, 1, 6, 6)
    reference = run(model, x, True)
    warp(model, where=lambda name, m: isinstance(m, nn.Conv2d) and name != "0", designate="0")
    assert list(model.warp_layers()) == ["0", "3.warp", "5.warp", "7.warp"]
    warp_names = [n for n, _ in model.named_warp_parameters()]
    assert warp_names[:2] == ["0.weight", "0.bias"] and len(warp_names) == 2 + 3 * 2
    assert "2.weight" in dict(model.named_adapt_parameters())
    assert_same(run(model, x, True), reference)


def test_task_film_parameters_are_adapt_parameters():
    model = warp(omniglot_net(), layer=functools.partial(TwoLayerResidualWarp, task_film=True))
    adapt, warp_ = dict(model.named_adapt_parameters()), dict(model.named_warp_parameters())
    assert {"0.3.warp.film.gamma", "0.3.warp.film.beta", "0.7.warp.film.gamma"} <= set(adapt)
    assert not any("film" in n for n in warp_)
    assert "0.3.warp.conv1.weight" in warp_ and "0.3.warp.bn2.weight" in warp_
    # ... also inside a designated layer
    model = nn.Sequential(nn.Linear(3, 3), TwoLayerResidualWarp(3, 0, task_film=True), nn.Linear(3, 1))
    warp(model, designate="1")
    assert sorted(n for n, _ in model.named_adapt_parameters() if n.startswith("1.")) == ["1.film.beta", "1.film.gamma"]


def test_partition_follows_replaced_parameters():
    model = warp(omniglot_net())
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert {id(p) for p in model.warp_parameters()} == {id(model.get_submodule(n).weight) for n in ["0.3.warp", "0.7.warp"]} | {
        id(model.get_submodule(n).bias) for n in ["0.3.warp", "0.7.warp"]
    }


def test_warp_layers_built_on_module_dtype_and_mode():
    model = omniglot_net().double().eval()
    warp(model, layer=ConvBNWarp)
    assert all(p.dtype == torch.float64 for p in model.warp_parameters())
    assert all(not m.training for m in model.modules())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert_same(model(x), unwarp(copy.deepcopy(model))(x))


def test_hooks_are_picklable_and_reindexed_on_load():
    model = warp(omniglot_net())
    for entry in model._warpopt_spec.inserted:
        assert isinstance(model.get_submodule(entry.host)._forward_hooks[entry.hook_id], warping._ApplyWarp)
    clone = copy.deepcopy(model)
    for entry in clone._warpopt_spec.inserted:
        hook = clone.get_submodule(entry.host)._forward_hooks[entry.hook_id]
        assert isinstance(hook, warping._ApplyWarp)
    handle = clone.get_submodule("0.3").register_forward_hook(lambda *a: None)  # must not clobber ours
    assert len(clone.get_submodule("0.3")._forward_hooks) == 2
    handle.remove()
    unwarp(clone)
    assert all(not m._forward_hooks for m in clone.modules())


def test_mlp_residual_warp_on_appendix_j_learner():
    model = nn.Sequential(*[m for i in range(3) for m in (nn.Linear(1 if i == 0 else 20, 20), nn.ReLU())], nn.Linear(20, 1))
    x = torch.randn(5, 1)
    reference = run(model, x, True)
    warp(model, layer=functools.partial(MLPResidualWarp, hidden=10))
    assert list(model.warp_layers()) == ["1.warp", "3.warp", "5.warp"]
    assert_same(run(model, x, True), reference)


# --------------------------------------------------------------------------------- bad input


def snapshot(model):
    return type(model), list(model.state_dict()), [dict(m._forward_hooks) for m in model.modules()]


class HasWarpAttr(nn.ReLU):
    def warp(self):  # a host with its own attribute named `warp`
        return None


def _fails_second_time():
    calls = []

    def factory(channels, spatial_dims):
        calls.append(1)
        return ConvWarp(channels, spatial_dims) if len(calls) == 1 else ConvWarp(channels + 1, spatial_dims)

    return factory


BAD = [
    (dict(where=nn.LSTM), ValueError, "Conv2d"),
    (dict(where=lambda n, m: False), ValueError, "MaxPool2d"),
    (dict(designate=nn.GRU), ValueError, "BatchNorm2d"),
    (dict(designate="0.99"), ValueError, "0.99"),
    (dict(designate=[]), ValueError, "designate"),
    (dict(where=3), TypeError, "where"),
    (dict(where=(nn.Conv2d, "x")), TypeError, "where"),
    (dict(designate=2.5), TypeError, "designate"),
    (dict(designate=[nn.Conv2d, "0"]), TypeError, "designate"),
    (dict(layer=lambda c, d: nn.Conv2d(c, c + 1, 1)), ValueError, "shape"),
    (dict(layer=lambda c, d: nn.Linear(c + 1, c)), ValueError, "dummy input"),
    (dict(layer=_fails_second_time()), ValueError, "shape"),
    (dict(layer=lambda c, d: "not a module"), TypeError, "nn.Module"),
    (dict(layer=5), TypeError, "factory"),
    (dict(where=nn.ReLU), ValueError, "channels"),
    (dict(where=lambda n, m: n in ("0.0", "0.3")), ValueError, "'0.3'"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD)
def test_bad_input_raises_and_leaves_the_model_unchanged(kwargs, error, message):
    model = omniglot_net()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        warp(model, **kwargs)
    assert snapshot(model) == before
    assert not is_warped(model) and not any(hasattr(m, "warp") for m in model.modules())


def test_bad_models():
    with pytest.raises(TypeError, match="nn.Module"):
        warp(lambda x: x)
    single = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="output layer"):
        warp(single)
    assert type(single) is nn.Sequential


def test_warping_twice_or_unwarping_an_unwarped_model_is_refused():
    model = warp(omniglot_net())
    before = snapshot(model)
    with pytest.raises(ValueError, match="warpopt.unwarp"):
        warp(model)
    assert snapshot(model) == before
    outer = nn.Sequential(model, nn.ReLU())
    with pytest.raises(ValueError, match="warpopt.unwarp"):
        warp(outer, designate="1")
    with pytest.raises(ValueError, match="not warped"):
        unwarp(omniglot_net())
    with pytest.raises(ValueError, match="warpopt.warp"):
        warping.named_warp_parameters(omniglot_net())


def test_host_with_a_warp_attribute_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), HasWarpAttr(), nn.Conv2d(2, 2, 1))
    before = snapshot(model)
    with pytest.raises(ValueError, match="attribute 'warp'"):
        warp(model)
    assert snapshot(model) == before
