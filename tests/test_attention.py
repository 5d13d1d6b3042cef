"""The exact objective (Eq. 7) on attention models: the replay differentiates through the task
gradient, so it must run attention with a kernel that has a double backward (warpopt.kernels).

Each model is written here, as a user would, around F.scaled_dot_product_attention,
nn.MultiheadAttention or nn.TransformerEncoder."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import warpopt
from finite_differences import check_exact_meta_gradient
from warpopt.kernels import replay_kernels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
FEATURES, LENGTH, CLASSES, VOCAB = 3, 5, 3, 11


class EncoderClassifier(nn.Module):
    """Linear embedding -> nn.TransformerEncoder -> mean pool -> head."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class AttentionClassifier(nn.Module):
    """Linear embedding -> nn.MultiheadAttention (residual) -> mean pool -> head."""

    def __init__(self, d: int = 4, need_weights: bool = False) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.embed = nn.Linear(FEATURES, d)
        self.attention = nn.MultiheadAttention(d, num_heads=2, batch_first=True)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attention(h, h, h, need_weights=self.need_weights)
        return self.head((h + a).mean(1))


class BertBlock(nn.Module):
    """A hand-written post-norm BERT layer calling F.scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 2 * d)
        self.ff2 = nn.Linear(2 * d, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x):
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, d)
        x = self.norm1(x + self.out(a))
        return self.norm2(x + self.ff2(F.gelu(self.ff1(x))))


class BertClassifier(nn.Module):
    """Token + position embeddings -> BertBlock -> [CLS] pooler (tanh) -> classifier."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Parameter(0.1 * torch.randn(LENGTH, d))
        self.block = BertBlock(d)
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, CLASSES)

    def forward(self, ids):
        h = self.block(self.tokens(ids) + self.positions)
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


MODELS = {"encoder": EncoderClassifier, "mha": AttentionClassifier, "bert": BertClassifier}
WARPED = {  # what warp(model, example_input=x) inserts: every Linear but the head (MHA's out_proj is never called)
    "encoder": ["embed.warp", "encoder.layers.0.linear1.warp", "encoder.layers.0.linear2.warp",
                "encoder.layers.1.linear1.warp", "encoder.layers.1.linear2.warp"],
    "mha": ["embed.warp"],
    "bert": ["block.qkv.warp", "block.out.warp", "block.ff1.warp", "block.ff2.warp", "pooler.warp"],
}


def batch(kind, n=4, generator=None, device="cpu", dtype=torch.float32):
    x = (torch.randint(0, VOCAB, (n, LENGTH), generator=generator) if kind == "bert"
         else torch.randn(n, LENGTH, FEATURES, generator=generator, dtype=dtype))
    return x.to(device), torch.randint(0, CLASSES, (n,), generator=generator).to(device)


def warped(kind, seed=0, device="cpu", dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    net = MODELS[kind](**kwargs).to(device, dtype)
    model = warpopt.warp(net, example_input=batch(kind, device=device, dtype=dtype)[0])
    with torch.no_grad():  # a non-identity warp, so second-order terms are not trivial
        for p in model.warp_parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_default_warp_skips_the_head_and_mha_out_proj(kind):
    assert list(warped(kind).warp_layers()) == WARPED[kind]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, options", [("encoder", {}), ("mha", {}), ("mha", {"need_weights": True}), ("bert", {})])
@pytest.mark.parametrize("train", [True, False])
def test_meta_step_with_the_default_exact_objective(kind, options, train, device):
    model = warped(kind, device=device, **options).train(train)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)  # exact objective, offline, Leap
    before = [p.detach().clone() for p in model.warp_parameters()]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        data = [batch(kind, generator=g, device=device) for _ in range(3)]
        with opt.task(data, F.cross_entropy):
            for x, y in data:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    stats = opt.meta_step()
    assert stats["warp_updates"] == 8  # offline, η = 1: θ_0..θ_3 of each of the 2 tasks
    assert math.isfinite(stats["meta_loss"])
    after = list(model.warp_parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("kind", ["encoder", "mha", "bert"])
def test_exact_meta_gradient_matches_finite_differences(kind):
    model = warped(kind, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    train, meta = batch(kind, generator=g, dtype=torch.float64), batch(kind, generator=g, dtype=torch.float64)
    assert check_exact_meta_gradient(model, train, meta, F.cross_entropy) <= 1e-6


def test_vectorised_replay_on_attention_equals_the_loop():
    results = []
    for gradient in (warpopt.objectives.meta_gradient, warpopt.vectorised.vectorised()):
        model = warped("encoder", dtype=torch.float64)
        opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, algorithm=warpopt.offline(batch_size=4, gradient=gradient),
                                            initialisation=warpopt.none(), meta_optimizer=torch.optim.SGD, meta_lr=1.0)
        g = torch.Generator().manual_seed(3)
        data = [batch("encoder", generator=g, dtype=torch.float64) for _ in range(3)]
        fixed = lambda k: data[k % 3]  # noqa: E731  (the same draws for both replays)
        with opt.task(fixed, F.cross_entropy):
            for x, y in data:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        opt.meta_step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.warp_parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=1e-10, rtol=0)


def test_replay_kernels_sets_and_restores_the_flags():
    lstm_model, plain = nn.Sequential(nn.LSTM(2, 2)), nn.Sequential(nn.Linear(2, 2))
    flags = lambda: (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),  # noqa: E731
                     torch.backends.cuda.math_sdp_enabled(), torch.backends.mha.get_fastpath_enabled(),
                     torch.backends.cudnn.enabled)
    outside = flags()
    assert outside[2] and outside[3]
    with replay_kernels(plain):
        assert flags()[:4] == (False, False, True, False) and flags()[4] == outside[4]
    with pytest.raises(KeyError):
        with replay_kernels(lstm_model):
            assert flags() == (False, False, True, False, False)
            with replay_kernels(plain):  # nesting
                pass
            assert flags() == (False, False, True, False, False)
            raise KeyError("leaves the flags as they were")
    assert flags() == outside


def test_replay_takes_the_training_code_path_of_multihead_attention(monkeypatch):
    """In eval mode, with nothing requiring a gradient (the approx objective's L_meta at a
    detached θ' upstream of any warp), nn.MultiheadAttention would take its C++ inference fast
    path; the task loop, which trains, never does. The replay stays on the training path."""

    class AttentionFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
            self.hidden = nn.Linear(4, 6)
            self.head = nn.Linear(6, CLASSES)

        def forward(self, x):
            a, _ = self.attention(x, x, x, need_weights=False)
            return self.head(torch.relu(self.hidden(a.mean(1))))

    calls = []
    fast = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or fast(*a, **k))
    torch.manual_seed(0)
    x0 = torch.randn(2, LENGTH, 4)
    model = warpopt.warp(AttentionFirst(), example_input=x0).eval()
    assert list(model.warp_layers()) == ["hidden.warp"]
    with torch.no_grad():
        model(x0)
    assert calls, "the fast path exists for this model in eval mode without gradients"
    calls.clear()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, objective=warpopt.approx)
    data = [(torch.randn(3, LENGTH, 4), torch.randint(0, CLASSES, (3,))) for _ in range(2)]
    with opt.task(data, F.cross_entropy):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    opt.meta_step()
    assert not calls
