"""The warp-layer zoo: identity at initialisation, shapes, learnability, factories."""

import copy
import functools
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from warpopt.layers import (
    ConvBNWarp,
    ConvWarp,
    LinearWarp,
    MLPResidualWarp,
    ResidualWarp,
    ScaleWarp,
    TaskAdaptable,
    TaskFiLM,
    TwoLayerResidualWarp,
    default_warp_layer,
)


# (factory, identity holds in train mode, needs non-negative inputs)
ZOO = {
    "default": (default_warp_layer, True, False),
    "conv3": (ConvWarp, True, False),
    "conv1": (functools.partial(ConvWarp, kernel_size=1), True, False),
    "conv5-nobias": (functools.partial(ConvWarp, kernel_size=5, bias=False), True, False),
    "linear": (LinearWarp, True, False),
    "linear-bias": (functools.partial(LinearWarp, bias=True), True, False),
    "scale": (ScaleWarp, True, False),
    "film": (TaskFiLM, True, False),
    "conv-bn": (ConvBNWarp, False, False),
    "conv-bn-relu": (functools.partial(ConvBNWarp, relu=True), False, True),
    "residual": (ResidualWarp, True, True),
    "two-layer": (TwoLayerResidualWarp, True, False),
    "two-layer-ta": (functools.partial(TwoLayerResidualWarp, task_film=True, hidden=3), True, False),
    "mlp": (MLPResidualWarp, True, False),
    "mlp-deep-relu": (functools.partial(MLPResidualWarp, hidden=7, depth=3, activation=nn.ReLU), True, False),
    "mlp-depth1": (functools.partial(MLPResidualWarp, depth=1), True, False),
}


@st.composite
def layer_and_input(draw):
    name = draw(st.sampled_from(sorted(ZOO)))
    factory, exact_in_train, non_negative = ZOO[name]
    channels = draw(st.integers(1, 5))
    spatial_dims = draw(st.sampled_from([0, 1, 2, 3]))
    batch = draw(st.integers(2, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=spatial_dims, max_size=spatial_dims)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn((batch, channels) + spatial, generator=gen) * scale
    if non_negative:
        x = x.abs()
    train = exact_in_train and draw(st.booleans())
    return name, factory(channels, spatial_dims), x, train


@settings(max_examples=80, deadline=None)
@given(layer_and_input())
def test_every_zoo_layer_is_the_identity_at_init(case):
    name, layer, x, train = case
    layer.train(train)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0, msg=f"{name} (train={train})")


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zoo_identity_on_2d_maps_eval_mode_and_dtypes(name, dtype):
    factory, _, non_negative = ZOO[name]
    layer = factory(4, 2).to(dtype).eval()
    x = torch.randn(3, 4, 5, 6, dtype=dtype) * 10
    x = x.abs() if non_negative else x
    y = layer(x)
    assert torch.equal(y, x)
    assert y.is_contiguous()  # layout kept: later ops (e.g. dropout masks) see the same strides


@pytest.mark.parametrize("name", sorted(ZOO))
def test_warp_parameters_receive_gradient_at_init(name):
    """Identity initialisation must not kill the meta-gradient of the warp."""
    factory, exact_in_train, _ = ZOO[name]
    layer = factory(3, 2).train(exact_in_train)
    x = torch.randn(4, 3, 5, 5).abs()
    (layer(x) * torch.randn(4, 3, 5, 5)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_conv_warp_structure():
    w = ConvWarp(3)
    assert w.weight.shape == (3, 3, 3, 3) and torch.equal(w.bias, torch.zeros(3))
    assert w.weight[:, :, 1, 1].equal(torch.eye(3)) and w.weight.sum() == 3
    assert ConvWarp(3, 1, kernel_size=5).weight.shape == (3, 3, 5)
    assert ConvWarp(3, 3, kernel_size=1).weight.shape == (3, 3, 1, 1, 1)
    features = ConvWarp(3, 0)
    assert features.weight.equal(torch.eye(3)) and features.kernel_size == 1
    assert ConvWarp(2, 2, bias=False).bias is None
    assert isinstance(default_warp_layer(4, 2), ConvWarp) and default_warp_layer(4, 2).kernel_size == 3
    assert default_warp_layer(4, 0).weight.equal(torch.eye(4))


def test_linear_warp_acts_per_position_on_maps():
    w = LinearWarp(3, 2)
    with torch.no_grad():
        w.weight.copy_(torch.randn(3, 3))
    x = torch.randn(2, 3, 4, 5)
    expected = torch.einsum("ij,njhw->nihw", w.weight, x)
    torch.testing.assert_close(w(x), expected)
    # ... which is a bias-free 1x1 conv.
    conv = ConvWarp(3, 2, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w.weight[:, :, None, None])
    torch.testing.assert_close(conv(x), expected)


def test_features_layers_accept_extra_leading_dims():
    x = torch.randn(2, 7, 3)
    for layer in (ConvWarp(3, 0), LinearWarp(3), ScaleWarp(3, 0), MLPResidualWarp(3), TaskFiLM(3, 0)):
        assert torch.equal(layer(x), x)


def test_conv_bn_warp_is_identity_only_in_eval_mode():
    layer = ConvBNWarp(3, 2)
    x = torch.randn(4, 3, 5, 5) * 5 + 2
    assert torch.equal(layer.eval()(x), x)
    assert (layer.bn.running_var + layer.bn.eps).eq(1).all()
    y = layer.train()(x)  # batch statistics: normalised, not the identity
    assert not torch.allclose(y, x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert not torch.equal(layer.eval()(x), x)  # the train-mode forward moved the running stats


def test_conv_bn_relu_warp_needs_non_negative_inputs():
    layer = ConvBNWarp(3, 1, relu=True).eval()
    x = torch.randn(2, 3, 8)
    assert torch.equal(layer(x.abs()), x.abs())
    assert torch.equal(layer(x), x.clamp(min=0))


def test_residual_warp_is_identity_in_both_modes_on_non_negative_inputs():
    layer = ResidualWarp(4, 2)
    x = torch.randn(3, 4, 6, 6).abs()
    assert torch.equal(layer.train()(x), x) and torch.equal(layer.eval()(x), x)
    assert layer.bn.weight.eq(0).all() and layer.bn.bias.eq(0).all()


def test_two_layer_residual_warp_structure():
    layer = TwoLayerResidualWarp(64, 2)
    assert layer.conv1.out_channels == 128 and layer.conv2.out_channels == 64  # Appendix F
    assert isinstance(layer.film, nn.Identity)
    ta = TwoLayerResidualWarp(8, 0, hidden=5, task_film=True)
    assert isinstance(ta.film, TaskFiLM) and isinstance(ta.film, TaskAdaptable)
    assert ta.film.gamma.shape == (5,) and ta.film.gamma.eq(0).all() and ta.film.beta.eq(0).all()
    assert isinstance(ta.conv1, nn.Linear) and ta.conv1.out_features == 5


def test_mlp_residual_warp_matches_appendix_j_defaults():
    layer = MLPResidualWarp(200)
    linears = [m for m in layer.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(200, 100), (100, 200)]
    assert any(isinstance(m, nn.Tanh) for m in layer.net)
    assert linears[-1].weight.eq(0).all() and linears[-1].bias.eq(0).all()
    assert len([m for m in MLPResidualWarp(3, depth=4).net if isinstance(m, nn.Linear)]) == 4


def test_task_film_formula():
    film = TaskFiLM(2, 1)
    with torch.no_grad():
        film.gamma.copy_(torch.tensor([1.0, -0.5]))
        film.beta.copy_(torch.tensor([0.0, 3.0]))
    x = torch.ones(1, 2, 3)
    expected = torch.tensor([[[2.0] * 3, [3.5] * 3]])
    assert torch.equal(film(x), expected)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ConvWarp(0),
        lambda: ConvWarp(3, 4),
        lambda: ConvWarp(3, 2, kernel_size=2),
        lambda: LinearWarp(-1),
        lambda: ScaleWarp(2, 5),
        lambda: MLPResidualWarp(3, depth=0),
        lambda: TwoLayerResidualWarp(3, hidden=0),
        lambda: ResidualWarp(3, kernel_size=4),
    ],
)
def test_bad_constructor_arguments(build):
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_layers_deepcopy_and_pickle(name):
    layer = ZOO[name][0](3, 2)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert clone.state_dict().keys() == layer.state_dict().keys()
