"""Property tests of the episodic N-way K-shot sampler (Vinyals et al. 2016)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warpopt.data import ClassificationTask, EpisodeSampler, TensorClassPool


def coded_pool(n_classes: int, per_class: int) -> TensorClassPool:
    """Images (1, 1, 2): pixel 0 = class, pixel 1 = index within the class."""
    x = torch.zeros(n_classes, per_class, 1, 1, 2)
    x[..., 0] = torch.arange(n_classes, dtype=torch.float32).view(-1, 1, 1, 1)
    x[..., 1] = torch.arange(per_class, dtype=torch.float32).view(1, -1, 1, 1)
    return TensorClassPool(x)


@st.composite
def configs(draw):
    n_classes = draw(st.integers(1, 12))
    ways = draw(st.integers(1, n_classes))
    shots = draw(st.integers(1, 5))
    queries = draw(st.integers(0, 5))
    per_class = draw(st.integers(shots + queries, shots + queries + 4))
    seed = draw(st.integers(0, 2**32))
    index = draw(st.integers(0, 10**6))
    return n_classes, per_class, ways, shots, queries, seed, index


@settings(max_examples=60, deadline=None)
@given(configs())
def test_episode_structure(cfg) -> None:
    n_classes, per_class, ways, shots, queries, seed, index = cfg
    sampler = EpisodeSampler(coded_pool(n_classes, per_class), ways, shots, queries, seed)
    ep = sampler.episode(index)
    assert ep.support_x.shape == (ways * shots, 1, 1, 2) and ep.query_x.shape == (ways * queries, 1, 1, 2)
    assert ep.classes.unique().numel() == ways  # exactly N distinct classes
    assert torch.bincount(ep.support_y, minlength=ways).tolist() == [shots] * ways
    assert torch.bincount(ep.query_y, minlength=ways).tolist() == [queries] * ways
    # images belong to the class their label maps to
    assert torch.equal(ep.support_x[:, 0, 0, 0].long(), ep.classes[ep.support_y])
    assert torch.equal(ep.query_x[:, 0, 0, 0].long(), ep.classes[ep.query_y])
    # support and query disjoint, no repeats
    ids = [tuple(v) for v in torch.cat([ep.support_x, ep.query_x]).view(-1, 2).long().tolist()]
    assert len(set(ids)) == len(ids)
    # deterministic in (seed, index)
    again = EpisodeSampler(coded_pool(n_classes, per_class), ways, shots, queries, seed).episode(index)
    for a, b in zip((ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.classes),
                    (again.support_x, again.support_y, again.query_x, again.query_y, again.classes)):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 2**32))
def test_different_seeds_differ(seed_a: int, seed_b: int) -> None:
    if seed_a == seed_b:
        return
    pool = coded_pool(50, 30)
    a = EpisodeSampler(pool, 5, 5, 15, seed_a)
    b = EpisodeSampler(pool, 5, 5, 15, seed_b)
    key = lambda e: (e.classes.tolist(), e.support_x.flatten().tolist())  # noqa: E731
    assert [key(a.episode(i)) for i in range(3)] != [key(b.episode(i)) for i in range(3)]
    assert key(a.episode(0)) != key(a.episode(1))  # different indices differ too


def test_iteration_and_relabelling() -> None:
    sampler = EpisodeSampler(coded_pool(20, 10), 5, 1, 2, seed=7, num_episodes=4)
    eps = list(sampler)
    assert len(eps) == len(sampler) == 4
    assert torch.equal(eps[2].classes, sampler.episode(2).classes)
    # label order is random: the class ids are not sorted in most episodes
    many = [sampler.episode(i).classes for i in range(20)]
    assert any(not torch.equal(c, c.sort().values) for c in many)


def test_errors() -> None:
    with pytest.raises(ValueError, match="ways"):
        EpisodeSampler(coded_pool(3, 10), ways=4, shots=1, queries=1)
    small = TensorClassPool([torch.zeros(10, 1, 2, 2), torch.zeros(3, 1, 2, 2)])
    with pytest.raises(ValueError, match="fewer than"):
        EpisodeSampler(small, ways=2, shots=2, queries=2)

    class Lazy:  # no size_of: checked when the class is drawn
        num_classes = 2

        def images_of(self, c: int) -> torch.Tensor:
            return torch.zeros(3, 1, 2, 2)

    with pytest.raises(ValueError, match="fewer than"):
        EpisodeSampler(Lazy(), ways=2, shots=2, queries=2).episode(0)
    ep = EpisodeSampler(Lazy(), ways=2, shots=1, queries=2).episode(0)
    assert ep.query_x.shape == (4, 1, 2, 2)


def test_task_from_episode() -> None:
    ep = EpisodeSampler(coded_pool(12, 20), ways=4, shots=6, queries=3, seed=2).episode(0)
    task = ClassificationTask.from_episode(ep, "ep0")
    assert task.num_classes == 4 and task.augmentation is None
    x, y = task.sample(10, torch.Generator().manual_seed(0))  # no augmentation configured
    ids = {tuple(v) for v in ep.support_x.view(-1, 2).tolist()}
    assert x.shape == (10, 1, 1, 2) and {tuple(v) for v in x.view(-1, 2).tolist()} <= ids
    assert torch.equal(ep.classes[y], x[:, 0, 0, 0].long())
    assert torch.equal(torch.cat([b for b, _ in task.test_batches(5)]), ep.query_x)
