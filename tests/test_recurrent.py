"""warp() on models built around nn.RNN / nn.LSTM / nn.GRU: a warp on the output sequence, the
hidden state untouched, the recurrent weights task-adaptable; LSTMWarp (Fig. 4c)."""
import copy
import io
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import warpopt
from finite_differences import check_exact_meta_gradient
from warpopt.objectives import meta_gradient
from warpopt.vectorised import vectorised

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
VOCAB, EMBED, CLASSES, LENGTH = 13, 4, 3, 6
CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class SequenceClassifier(nn.Module):
    """Embedding -> RNN/LSTM/GRU -> Linear on the last step's output, as users write it."""

    def __init__(self, cell="lstm", hidden=5, batch_first=True, **options) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.rnn = CELLS[cell](EMBED, hidden, batch_first=batch_first, **options)
        features = (options.get("proj_size") or hidden) * (2 if options.get("bidirectional") else 1)
        self.fc = nn.Linear(features, CLASSES)

    def sequence(self, ids):
        """(output sequence, hidden state) of the recurrent layer; ids are (batch, time)."""
        return self.rnn(self.embed(ids if self.batch_first else ids.t()))

    def forward(self, ids):
        out, _ = self.sequence(ids)
        return self.fc(out[:, -1] if self.batch_first else out[-1])


def tokens(n=4, generator=None):
    return torch.randint(0, VOCAB, (n, LENGTH), generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def hidden_state(model, ids):
    _, h = model.sequence(ids)
    return torch.cat([t.reshape(-1) for t in (h if isinstance(h, tuple) else (h,))])


LAYERS = {
    "default": None,
    "linear": warpopt.LinearWarp,
    "scale": warpopt.ScaleWarp,
    "mlp": functools.partial(warpopt.MLPResidualWarp, hidden=4),
    "lstm": functools.partial(warpopt.LSTMWarp, hidden=3),
}


@st.composite
def configurations(draw):
    cell = draw(st.sampled_from(sorted(CELLS)))
    options = {"num_layers": draw(st.integers(1, 2)), "bidirectional": draw(st.booleans())}
    if cell == "lstm" and draw(st.booleans()):
        options["proj_size"] = 2
    return cell, draw(st.booleans()), options, draw(st.sampled_from(sorted(LAYERS))), draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(configurations())
def test_default_warp_of_any_recurrent_classifier(config):
    cell, batch_first, options, layer, seed = config
    torch.manual_seed(seed)
    reference = SequenceClassifier(cell, batch_first=batch_first, **options)
    model = copy.deepcopy(reference)
    ids, _ = tokens()
    kwargs = {} if LAYERS[layer] is None else {"layer": LAYERS[layer]}
    warpopt.warp(model, example_input=ids, **kwargs)

    assert list(model.warp_layers()) == ["rnn.warp"]  # fc is the output layer
    assert [n for n, _ in model.named_adapt_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(n.startswith("rnn.warp.") for n, _ in model.named_warp_parameters())
    for train in (True, False):  # identity at insertion
        model.train(train), reference.train(train)
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-6, rtol=0)

    with torch.no_grad():  # a moved warp changes the output sequence, never the hidden state
        for p in model.warp_parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert torch.equal(hidden_state(model, ids), hidden_state(reference, ids))
    assert not torch.allclose(model.sequence(ids)[0], reference.sequence(ids)[0])
    assert not torch.allclose(model(ids), reference(ids))


def test_warp_sees_the_sequence_batch_first_and_returns_the_host_layout():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return 2 * x

    for batch_first in (True, False):
        torch.manual_seed(0)
        reference = SequenceClassifier("gru", batch_first=batch_first)
        model = warpopt.warp(copy.deepcopy(reference), where="rnn", layer=lambda c, d: Spy())
        ids, _ = tokens()
        out, h = model.sequence(ids)
        ref_out, ref_h = reference.sequence(ids)
        assert seen[-1] == (4, LENGTH, 5) and out.is_contiguous() == ref_out.is_contiguous()
        assert torch.equal(out, 2 * ref_out) and torch.equal(h, ref_h)
    rnn = warpopt.warp(nn.Sequential(nn.LSTM(EMBED, 5)), where="0", layer=lambda c, d: Spy())[0]
    out, _ = rnn(torch.randn(LENGTH, EMBED))  # unbatched (L, C)
    assert seen[-1] == (1, LENGTH, 5) and out.shape == (LENGTH, 5)


def test_packed_sequences_are_warped_per_valid_step():
    torch.manual_seed(0)
    rnn = nn.LSTM(EMBED, 5, batch_first=True)
    reference = copy.deepcopy(rnn)
    layer = functools.partial(warpopt.LSTMWarp, hidden=3)
    warped = warpopt.warp(nn.Sequential(rnn), where=nn.LSTM, layer=layer)[0]
    with torch.no_grad():
        for p in warped.warp.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, lengths = torch.randn(3, LENGTH, EMBED), torch.tensor([6, 2, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, (h, c) = warped(packed)
    ref_out, (ref_h, ref_c) = reference(packed)
    assert torch.equal(h, ref_h) and torch.equal(c, ref_c)
    padded, got_lengths = pad_packed_sequence(out, batch_first=True)
    ref_padded, _ = pad_packed_sequence(ref_out, batch_first=True)
    assert torch.equal(got_lengths, lengths)
    expected = warped.warp(ref_padded)  # the warp LSTM is causal: padding never reaches a valid step
    for i, n in enumerate(lengths):
        torch.testing.assert_close(padded[i, :n], expected[i, :n])
        assert torch.equal(padded[i, n:], torch.zeros_like(padded[i, n:]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layer", ["default", "lstm"])
def test_recurrent_classifier_meta_trains_in_two_lines(cell, layer, device):
    torch.manual_seed(0)
    net = SequenceClassifier(cell).to(device)
    ids, _ = tokens()
    kwargs = {} if LAYERS[layer] is None else {"layer": LAYERS[layer]}
    model = warpopt.warp(net, example_input=ids.to(device), **kwargs)  # line 1
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.5)                   # line 2 (exact objective, Leap)
    weights = model.rnn.weight_hh_l0
    assert any(p is weights for p in opt.param_groups[0]["params"])  # recurrent weights adapt
    phi = [p.detach().clone() for p in model.warp_parameters()]
    theta0 = [t.detach().clone() for t in opt.theta0]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        data = [tuple(t.to(device) for t in tokens(generator=g)) for _ in range(3)]
        with opt.task(data, F.cross_entropy):
            start = weights.detach().clone()
            for x, y in data:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            assert not torch.equal(weights, start)
    stats = opt.meta_step()
    assert stats["warp_updates"] == 8
    assert any(not torch.equal(a, b) for a, b in zip(model.warp_parameters(), phi))
    assert any(not torch.equal(a, b) for a, b in zip(opt.theta0, theta0))


@pytest.mark.parametrize("cell, layer", [("lstm", "default"), ("gru", "lstm")])
def test_exact_meta_gradient_through_recurrent_layers_matches_finite_differences(cell, layer):
    torch.manual_seed(0)
    net = SequenceClassifier(cell, hidden=3).double()
    kwargs = {} if LAYERS[layer] is None else {"layer": functools.partial(warpopt.LSTMWarp, hidden=2)}
    model = warpopt.warp(net, example_input=tokens()[0], **kwargs)
    with torch.no_grad():  # a non-identity warp, so second-order terms are not trivial
        for p in model.warp_parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    assert check_exact_meta_gradient(model, tokens(generator=g), tokens(generator=g), F.cross_entropy) <= 1e-6



class PackedClassifier(nn.Module):
    """Padded token ids (0 = padding) packed by length before the RNN, as users write it."""

    def __init__(self, cell="lstm", **options) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.rnn = CELLS[cell](EMBED, 3, batch_first=True, **options)
        self.fc = nn.Linear(3 * (2 if options.get("bidirectional") else 1), CLASSES)

    def forward(self, ids):
        lengths = (ids != 0).sum(1).clamp(min=1)
        out, _ = self.rnn(pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False))
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return self.fc(padded.sum(1) / lengths[:, None])


def padded_tokens(generator):
    ids, y = tokens(generator=generator)
    ids[1:, -2:] = 0  # shorter sequences
    ids[2, 2:] = 0
    return ids, y


@pytest.mark.parametrize("cell, options", [("lstm", {}), ("gru", {"bidirectional": True, "num_layers": 2})])
def test_exact_meta_gradient_through_packed_sequences_matches_finite_differences(cell, options):
    # torch.func.grad cannot run the packed recurrent kernels ("Cannot access data pointer of
    # Tensor that doesn't have storage"): the per-sample replay differentiates with autograd.
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(3)
    model = warpopt.warp(PackedClassifier(cell, **options).double(), example_input=padded_tokens(g)[0])
    with torch.no_grad():
        for p in model.warp_parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert check_exact_meta_gradient(model, padded_tokens(g), padded_tokens(g), F.cross_entropy) <= 1e-6



class HiddenStateClassifier(SequenceClassifier):
    """Reads only h_n: the output sequence, where a warp acts, never reaches the prediction."""

    def __init__(self, cell="lstm", hidden_layer=False):
        super().__init__(cell)
        self.pre = nn.Linear(EMBED, EMBED) if hidden_layer else None

    def forward(self, ids):
        x = self.embed(ids)
        _, h = self.rnn(self.pre(x) if self.pre is not None else x)
        return self.fc((h[0] if isinstance(h, tuple) else h)[-1])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_warp_whose_sequence_is_never_read_is_not_made(cell):
    ids, _ = tokens()
    model = HiddenStateClassifier(cell)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"output sequence of \['rnn'\] does not reach.*h_n"):
        warpopt.warp(model, example_input=ids)
    assert not warpopt.is_warped(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # with another hidden layer the default warps that one only
    model = warpopt.warp(HiddenStateClassifier(cell, hidden_layer=True), example_input=ids)
    assert list(model.warp_layers()) == ["pre.warp"]
    # the sequence read (the usual classifier): the RNN is warped
    assert list(warpopt.warp(SequenceClassifier(cell), example_input=ids).warp_layers()) == ["rnn.warp"]


def test_where_accepts_module_names_and_patterns():
    for where in ("rnn", ["rnn"], "r*", nn.LSTM):
        model = warpopt.warp(SequenceClassifier(), where=where)
        assert list(model.warp_layers()) == ["rnn.warp"]
    model = warpopt.warp(SequenceClassifier(), where=["rnn", "fc"])
    assert list(model.warp_layers()) == ["rnn.warp", "fc.warp"]
    model = warpopt.warp(SequenceClassifier(), exclude="fc")
    assert list(model.warp_layers()) == ["rnn.warp"]


def test_warp_layers_that_cannot_read_a_sequence_are_refused():
    model = SequenceClassifier()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"\(batch, time, features\)"):
        warpopt.warp(model, where="rnn", layer=warpopt.ResidualWarp)  # BatchNorm1d reads dim 1 as channels
    with pytest.raises(ValueError, match="LSTMWarp warps sequences"):
        warpopt.warp(model, where="fc", layer=warpopt.LSTMWarp)
    assert not warpopt.is_warped(model) and not hasattr(model.rnn, "warp")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_vectorised_replay_falls_back_to_the_loop_for_recurrent_models():
    torch.manual_seed(0)
    model = warpopt.warp(SequenceClassifier().double(), example_input=tokens()[0])
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.5, initialisation=warpopt.none())
    data = [tokens() for _ in range(2)]
    with opt.task(lambda k: data[k % 2], F.cross_entropy):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    samples = [opt.replay.sample(i, opt.device) for i in range(len(opt.replay))]
    context, params = opt.replay_context(), opt.meta_parameters()
    with opt.warp_trainable():
        loop, _ = meta_gradient(warpopt.exact, context, samples, params)
        vec, _ = vectorised()(warpopt.exact, context, samples, params)
        with pytest.raises(TypeError, match="vmap has no batching rule.*LSTM"):
            vectorised(fallback=False)(warpopt.exact, context, samples, params)
    for a, b in zip(vec, loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_recurrent_warp_round_trips_and_unwarps():
    torch.manual_seed(0)
    reference = SequenceClassifier("lstm", batch_first=False)
    ids, _ = tokens()
    model = warpopt.warp(copy.deepcopy(reference), example_input=ids, layer=LAYERS["lstm"])
    with torch.no_grad():
        for p in model.warp_parameters():
            p.add_(0.3 * torch.randn_like(p))
    expected = model(ids)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(model)
    fresh = warpopt.warp(SequenceClassifier("lstm", batch_first=False), example_input=ids, layer=LAYERS["lstm"])
    fresh.load_state_dict(model.state_dict())
    for other in (loaded, clone, fresh):
        assert torch.equal(other(ids), expected)
    warpopt.unwarp(model)
    assert not hasattr(model.rnn, "warp") and not model.rnn._forward_hooks
    assert torch.equal(model(ids), reference(ids))
