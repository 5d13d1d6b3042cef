"""The output layer is never warped silently (warpopt.selection): found by one traced forward
(example_input=), named (exclude=), read off an nn.Sequential structure, or refused; and
selectors by module name and glob pattern."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import warpopt
from test_warping import architectures, build, snapshot
from warpopt import warp


class HeadFirst(nn.Module):
    """The issue's model: the output layer is registered before the hidden layers."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.hidden = nn.Linear(6, 6)
        self.body = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(torch.relu(self.body(x)))))


class Permuted(nn.Module):
    """An MLP called in the order l0, l1, ..., registered in the order ``order``."""

    def __init__(self, widths, order):
        super().__init__()
        self.depth = len(widths) - 1
        for i in order:
            self.add_module(f"l{i}", nn.Linear(widths[i], widths[i + 1]))

    def forward(self, x):
        for i in range(self.depth):
            x = getattr(self, f"l{i}")(x)
            x = torch.tanh(x) if i < self.depth - 1 else x
        return x


class TwoHeads(nn.Module):
    """Actor-critic: a shared GRU, a value head registered first, a policy head, an unused layer."""

    def __init__(self):
        super().__init__()
        self.value = nn.Linear(5, 1)
        self.unused = nn.Linear(5, 5)
        self.core = nn.GRU(3, 5, batch_first=True)
        self.policy = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 4))

    def forward(self, x):
        h, _ = self.core(x)
        return self.policy(h), self.value(h).squeeze(-1)


def test_a_head_registered_first_is_never_warped():
    model, x = HeadFirst(), torch.randn(5, 4)
    reference = copy.deepcopy(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="example_input.*exclude.*where") as raised:
        warp(model)
    assert "exclude='body'" not in str(raised.value)  # no example naming a hidden layer as the output
    assert snapshot(model) == before and not warpopt.is_warped(model)

    warp(model, example_input=x)
    assert list(model.warp_layers()) == ["hidden.warp", "body.warp"]
    assert not hasattr(model.head, "warp")
    assert torch.equal(model(x), reference(x))
    assert list(warp(copy.deepcopy(reference), exclude="head").warp_layers()) == ["hidden.warp", "body.warp"]


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_any_registration_order_finds_the_called_last_layer(data):
    depth = data.draw(st.integers(2, 5))
    widths = data.draw(st.lists(st.integers(1, 4), min_size=depth + 1, max_size=depth + 1))
    order = data.draw(st.permutations(range(depth)))
    model = Permuted(widths, order)
    x = torch.randn(3, widths[0])
    expected = torch.clone(model(x))
    warp(model, example_input=x)
    assert sorted(model.warp_layers()) == [f"l{i}.warp" for i in range(depth - 1)]
    assert torch.equal(model(x), expected)


@settings(max_examples=30, deadline=None)
@given(architectures())
def test_tracing_agrees_with_the_sequential_structure(arch):
    if arch.kind == "handwritten":  # no structure to agree with: tracing is the only way
        model, x = build(arch)
        with pytest.raises(ValueError, match="example_input"):
            warp(model)
        return
    structural, x = build(arch)
    traced, _ = build(arch)
    warp(structural)
    warp(traced, example_input=x)
    assert list(traced.warp_layers()) == list(structural.warp_layers())


def test_every_head_of_a_multi_head_model_is_an_output_layer():
    model, x = TwoHeads(), torch.randn(2, 7, 3)
    warp(model, example_input=x)
    # policy.2 and value write the outputs; 'unused' never runs; the GRU gets a sequence warp,
    # policy.0 a warp after its ReLU
    assert list(model.warp_layers()) == ["core.warp", "policy.1.warp"]


def test_trace_changes_nothing_observable():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # a frozen weight stays frozen
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3)
    rng = torch.get_rng_state()
    warp(model, example_input=x)
    assert torch.equal(torch.get_rng_state(), rng)  # the traced dropout drew from a forked stream
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())  # BN statistics
    assert not model[0].weight.requires_grad and model[4].weight.requires_grad
    assert all(len(m._forward_hooks) == (1 if hasattr(m, "warp") else 0) for m in model.modules())


def test_output_without_a_gradient_path_falls_back_to_the_last_called_layer():
    class Argmax(HeadFirst):
        def forward(self, x):
            return super().forward(x).argmax(-1)

    model = warp(Argmax(), example_input=torch.randn(5, 4))
    assert list(model.warp_layers()) == ["hidden.warp", "body.warp"]


def test_selectors_by_name_and_pattern():
    def net():
        blocks = [nn.Sequential() for _ in range(2)]
        for b in blocks:
            b.add_module("fc1", nn.Linear(4, 4))
            b.add_module("act", nn.ReLU())
            b.add_module("fc2", nn.Linear(4, 4))
        return nn.Sequential(nn.Sequential(*blocks), nn.Linear(4, 2))

    assert list(warp(net(), where="0.*.fc1").warp_layers()) == ["0.0.act.warp", "0.1.act.warp"]
    assert list(warp(net(), where=("0.1.fc2", "0.0.fc2")).warp_layers()) == ["0.0.fc2.warp", "0.1.fc2.warp"]
    assert list(warp(net(), designate="0.*.fc?").warp_layers()) == ["0.0.fc1", "0.0.fc2", "0.1.fc1", "0.1.fc2"]
    # exclude: a whole block, on top of the output layer (found by structure or by a forward)
    assert list(warp(net(), exclude="0.1").warp_layers()) == ["0.0.act.warp", "0.0.fc2.warp"]
    assert list(warp(net(), exclude="0.0.fc1", example_input=torch.randn(2, 4)).warp_layers()) == [
        "0.0.fc2.warp", "0.1.act.warp", "0.1.fc2.warp"]
    # ... and filtering an explicit where
    assert list(warp(net(), where=nn.Linear, exclude="1").warp_layers()) == [
        "0.0.act.warp", "0.0.fc2.warp", "0.1.act.warp", "0.1.fc2.warp"]


BAD = [
    (dict(where="0.*.fc3"), ValueError, r"0\.\*\.fc3"),
    (dict(where=["0.0.fc1", "nope"]), ValueError, "nope"),
    (dict(exclude="head"), ValueError, "head"),
    (dict(where=nn.Linear, example_input=torch.randn(2, 4)), ValueError, "example_input"),
    (dict(designate="0.0.fc1", exclude="1"), ValueError, "exclude"),
    (dict(example_input=torch.randn(2, 5)), ValueError, "example_input.*forward failed"),
    (dict(where=nn.Linear, exclude=nn.Linear), ValueError, "removes"),
    (dict(where=["0.0.fc1", nn.Linear]), TypeError, "where"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD)
def test_bad_selection_raises_and_leaves_the_model_unchanged(kwargs, error, message):
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), nn.Linear(4, 2))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        warp(model, **kwargs)
    assert snapshot(model) == before and not warpopt.is_warped(model)


def test_meta_training_a_head_first_model_keeps_the_head_unwarped():
    torch.manual_seed(0)
    model = warp(HeadFirst(), example_input=torch.randn(2, 4))
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    with opt.task(data, F.cross_entropy):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    opt.meta_step()
    assert {n for n, _ in model.named_warp_parameters()} == {
        "hidden.warp.weight", "hidden.warp.bias", "body.warp.weight", "body.warp.bias"}


class ReturnsHidden(nn.Module):
    """Hugging Face style: the output carries the hidden states too, so every layer reaches it."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(6, 3)
        self.dense = nn.Linear(4, 6)

    def forward(self, x):
        hidden = torch.tanh(self.dense(x))
        return {"logits": self.classifier(hidden), "hidden_states": hidden}


def test_a_model_returning_its_hidden_states_is_told_how_to_name_the_output_layer():
    model = ReturnsHidden()
    with pytest.raises(ValueError, match=r"\['dense', 'classifier'\] all reach.*exclude='classifier'"):
        warp(model, example_input=torch.randn(2, 4))
    assert not warpopt.is_warped(model)
    assert list(warp(model, exclude="classifier").warp_layers()) == ["dense.warp"]  # the advice works
