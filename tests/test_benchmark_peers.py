"""The MAML peer benchmark compares equal things: every contender's float64 meta-gradient is
warpopt ``maml()``'s (benchmarks/_maml.py). Peers are optional (``pip install -e .[bench]``);
a test whose peer is not installed is skipped, the hand-written torch MAML always runs."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _maml  # noqa: E402

SETTING = _maml.Setting(meta_batch=2, steps=3)


def _gap(peer: str, cls=None) -> float:
    gaps = _maml.meta_gradient_gap({peer: cls or _maml.PEERS[peer]}, SETTING, seed=1)
    assert gaps["(|meta-gradient|, max)"] > 1e-3  # the meta-step moved θ0: the comparison is not vacuous
    return gaps[peer]


@pytest.mark.parametrize("hand_written", ["torch", "torch-add"])
def test_handwritten_maml_gives_warpopt_meta_gradient(hand_written):
    assert _gap(hand_written) <= 1e-10


@pytest.mark.parametrize("peer", ["higher", "torchopt"])
def test_peer_gives_warpopt_meta_gradient(peer):
    pytest.importorskip(peer)
    assert _gap(peer) <= 1e-10


def test_learn2learn_gives_warpopt_meta_gradient():
    try:
        _maml.learn2learn_maml()
    except ImportError as e:
        pytest.skip(str(e))
    assert _gap("learn2learn") <= 1e-10


def test_gap_detects_a_different_meta_gradient():
    """A first-order contender (task gradients detached) must not pass as the same."""

    class FirstOrder(_maml.TorchMAML):
        def task(self, support, query, n):
            (xs, ys), (xq, yq) = support, query
            theta = dict(self.net.named_parameters())
            for _ in range(self.s.steps):
                loss = torch.nn.functional.cross_entropy(torch.func.functional_call(self.net, theta, (xs,)), ys)
                grads = torch.autograd.grad(loss, list(theta.values()))
                theta = {k: p - self.s.lr * g for (k, p), g in zip(theta.items(), grads)}
            (torch.nn.functional.cross_entropy(torch.func.functional_call(self.net, theta, (xq,)), yq) / n).backward()

    assert _gap("first-order", FirstOrder) > 1e-6


def test_warp_maml_meta_gradient_equals_the_hand_written_one():
    """Warp-MAML (online, exact, maml()) through warpopt: φ and θ0 meta-gradients by hand."""
    import functools

    import warpopt

    warp = functools.partial(_maml.TorchWarpMAML, warp=warpopt.warp)
    small = _maml.Setting(meta_batch=2, steps=3, filters=8)
    gaps = _maml.meta_gradient_gap({"by hand": warp}, small, seed=2,
                                   reference=functools.partial(_maml.WarpMAML, warp=warpopt.warp))
    assert gaps["(|meta-gradient|, max)"] > 1e-3
    assert gaps["by hand"] <= 1e-10
