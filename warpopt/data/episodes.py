"""Episodic N-way K-shot sampling (Vinyals et al., 2016; WarpGrad Appendix H).

An *episode* (task instance) draws ``N`` distinct classes from a class pool,
then per class ``K`` support ("training") images and a disjoint set of ``L``
query ("validation") images, without replacement within the class. Labels are
re-assigned ``0..N-1`` in a random order. WarpGrad's few-shot experiments use
``N = 5``, ``K in {1, 5}`` (meta-train ``K in {5, 15}``), ``L = 15`` and
600 evaluation episodes; its multi-shot miniImageNet runs use ``N = 10``,
``K = 640``, ``L = 50``.

A *class pool* is anything with ``num_classes`` and ``images_of(c)`` returning
all images of class ``c`` as a ``(n_c, C, H, W)`` tensor. Pools that load
lazily may also provide ``size_of(c) -> int`` (lets the sampler validate
without decoding) and ``images_at(c, index) -> Tensor`` (decode only the
requested images); :class:`EpisodeSampler` uses them when present.

:class:`ClassificationTask` is the multi-shot counterpart: a fixed training
split to draw random (augmented) mini-batches from and a held-out test split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .transforms import random_affine

__all__ = ["ClassPool", "TensorClassPool", "Episode", "EpisodeSampler", "episode_seed", "ClassificationTask"]


@runtime_checkable
class ClassPool(Protocol):
    """Minimal interface of a labelled image collection, grouped by class."""

    @property
    def num_classes(self) -> int:  # pragma: no cover - protocol
        """Number of classes ``n``; classes are ``0..n-1``."""
        ...

    def images_of(self, c: int) -> torch.Tensor:  # pragma: no cover - protocol
        """All images of class ``c``: float tensor ``(n_c, C, H, W)``."""
        ...


def _pool_size_of(pool: ClassPool, c: int) -> int:
    size_of = getattr(pool, "size_of", None)
    if size_of is not None:
        return int(size_of(c))
    return int(pool.images_of(c).shape[0])


def _pool_images_at(pool: ClassPool, c: int, index: torch.Tensor) -> torch.Tensor:
    images_at = getattr(pool, "images_at", None)
    if images_at is not None:
        return images_at(c, index)
    images = pool.images_of(c)
    return images[index.to(images.device)]


class TensorClassPool:
    """In-memory class pool.

    Args:
        images_by_class: either one tensor ``(n_classes, n_per_class, C, H, W)``
            or a sequence of per-class tensors ``(n_c, C, H, W)`` (sizes may
            differ between classes).
        class_names: optional names, one per class.
    """

    def __init__(
        self,
        images_by_class: torch.Tensor | Sequence[torch.Tensor],
        class_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(images_by_class, torch.Tensor):
            if images_by_class.dim() != 5:
                raise ValueError(
                    "a single tensor must have shape (n_classes, n_per_class, C, H, W), "
                    f"got {tuple(images_by_class.shape)}"
                )
            self._images: list[torch.Tensor] = list(images_by_class.unbind(0))
        else:
            self._images = list(images_by_class)
        for c, x in enumerate(self._images):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"class {c}: expected a tensor (n_c, C, H, W), got {getattr(x, 'shape', type(x))}")
        if class_names is not None and len(class_names) != len(self._images):
            raise ValueError(f"{len(class_names)} class names for {len(self._images)} classes")
        self.class_names: list[str] = (
            list(class_names) if class_names is not None else [str(c) for c in range(len(self._images))]
        )

    @property
    def num_classes(self) -> int:
        return len(self._images)

    def size_of(self, c: int) -> int:
        return int(self._images[c].shape[0])

    def images_of(self, c: int) -> torch.Tensor:
        return self._images[c]

    def images_at(self, c: int, index: torch.Tensor) -> torch.Tensor:
        x = self._images[c]
        return x[index.to(x.device)]

    def to(self, device: torch.device | str) -> TensorClassPool:
        """A copy of the pool with every class tensor on ``device``."""
        return TensorClassPool([x.to(device) for x in self._images], self.class_names)

    def __len__(self) -> int:
        return self.num_classes


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task instance.

    Attributes:
        support_x: ``(N*K, C, H, W)`` support images, grouped by label
            (label 0's K images first, ...).
        support_y: ``(N*K,)`` int64 labels in ``0..N-1``.
        query_x: ``(N*L, C, H, W)`` query images, grouped by label.
        query_y: ``(N*L,)`` int64 labels.
        classes: ``(N,)`` int64 pool class of each label: label ``j`` is pool
            class ``classes[j]``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    def to(self, device: torch.device | str) -> Episode:
        """The episode with all tensors on ``device``."""
        tensors = (self.support_x, self.support_y, self.query_x, self.query_y, self.classes)
        return Episode(*(t.to(device) for t in tensors))


def episode_seed(seed: int, index: int) -> int:
    """Per-episode 63-bit seed derived from ``(seed, index)`` with numpy's SeedSequence."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class EpisodeSampler:
    """Seeded, reproducible N-way K-shot episodes from a class pool.

    ``episode(i)`` depends only on ``(seed, i)`` and the pool: the per-episode
    ``torch.Generator`` is seeded with :func:`episode_seed`. Iterating yields
    ``episode(0), episode(1), ...`` (forever unless ``num_episodes`` is set).

    Args:
        pool: a :class:`ClassPool`.
        ways: ``N`` classes per episode.
        shots: ``K`` support images per class.
        queries: ``L`` query images per class (disjoint from the support).
        seed: non-negative base seed.
        num_episodes: length of the iteration (``None``: infinite).

    Raises:
        ValueError: ``ways > pool.num_classes``, non-positive sizes, or (checked
            up front when the pool has ``size_of``, otherwise when the class is
            drawn) a class with fewer than ``K + L`` images.
    """

    def __init__(
        self,
        pool: ClassPool,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        num_episodes: int | None = None,
    ) -> None:
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(f"need ways >= 1, shots >= 1, queries >= 0; got {ways}, {shots}, {queries}")
        if ways > pool.num_classes:
            raise ValueError(f"ways={ways} exceeds the number of classes in the pool ({pool.num_classes})")
        if num_episodes is not None and num_episodes < 0:
            raise ValueError(f"num_episodes must be >= 0, got {num_episodes}")
        self.pool = pool
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.seed = int(seed)
        self.num_episodes = num_episodes
        if hasattr(pool, "size_of"):
            need = self.shots + self.queries
            small = [c for c in range(pool.num_classes) if _pool_size_of(pool, c) < need]
            if small:
                raise ValueError(
                    f"{len(small)} classes have fewer than shots + queries = {need} images "
                    f"(first: class {small[0]} with {_pool_size_of(pool, small[0])})"
                )

    def generator(self, index: int) -> torch.Generator:
        """The CPU generator that episode ``index`` draws from."""
        return torch.Generator().manual_seed(episode_seed(self.seed, index))

    def episode(self, index: int) -> Episode:
        """Episode number ``index`` (deterministic in ``(seed, index)``)."""
        g = self.generator(index)
        n, k, q = self.ways, self.shots, self.queries
        classes = torch.randperm(self.pool.num_classes, generator=g)[:n]
        sx, qx = [], []
        for c in classes.tolist():
            size = _pool_size_of(self.pool, c)
            if size < k + q:
                raise ValueError(f"class {c} has {size} images, fewer than shots + queries = {k + q}")
            pick = torch.randperm(size, generator=g)[: k + q]
            x = _pool_images_at(self.pool, c, pick)
            sx.append(x[:k])
            qx.append(x[k:])
        support_x = torch.cat(sx)
        query_x = torch.cat(qx)
        labels = torch.arange(n, dtype=torch.long)
        return Episode(
            support_x=support_x,
            support_y=labels.repeat_interleave(k).to(support_x.device),
            query_x=query_x,
            query_y=labels.repeat_interleave(q).to(query_x.device),
            classes=classes,
        )

    def __iter__(self) -> Iterator[Episode]:
        i = 0
        while self.num_episodes is None or i < self.num_episodes:
            yield self.episode(i)
            i += 1

    def __len__(self) -> int:
        if self.num_episodes is None:
            raise TypeError("infinite EpisodeSampler has no len(); pass num_episodes")
        return self.num_episodes


def _draw_indices(n: int, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """``batch_size`` indices into ``range(n)``: a random subset, or for
    ``batch_size > n`` concatenated permutations (each index at most
    ``ceil(batch_size / n)`` times)."""
    reps = -(-batch_size // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])[:batch_size]


class ClassificationTask:
    """One classification task with a training split and a held-out test split.

    Used for the multi-shot protocols: an Omniglot alphabet (20-way, 15
    training and 5 test drawings per character, see
    :func:`warpopt.data.omniglot.multishot_split`), or an episode turned into
    a task with :meth:`from_episode` (e.g. multi-shot miniImageNet, N=10,
    K=640, L=50).

    Attributes:
        name: task name (e.g. the alphabet).
        train_images: ``(n_train, C, H, W)``; for Omniglot ``(300, 1, S, S)``.
        train_labels: int64 ``(n_train,)`` in ``0..num_classes-1``.
        test_images: ``(n_test, C, H, W)``; for Omniglot ``(100, 1, S, S)``.
        test_labels: int64 ``(n_test,)``.
        augmentation: keyword arguments of :func:`random_affine` applied by
            :meth:`sample` (``None``: no augmentation; Omniglot tasks get
            :data:`warpopt.data.omniglot.AUGMENTATION`).
    """

    def __init__(
        self,
        name: str,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        augmentation: dict | None = None,
    ) -> None:
        self.name = name
        self.train_images, self.train_labels = train_images, train_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.augmentation = None if augmentation is None else dict(augmentation)

    @classmethod
    def from_episode(
        cls, episode: Episode, name: str = "episode", augmentation: dict | None = None
    ) -> ClassificationTask:
        """Support set as the training split, query set as the test split."""
        return cls(name, episode.support_x, episode.support_y, episode.query_x, episode.query_y, augmentation)

    @property
    def num_classes(self) -> int:
        return int(self.train_labels.max().item()) + 1

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def to(self, device: torch.device | str) -> ClassificationTask:
        """A copy of the task with all tensors on ``device``."""
        return ClassificationTask(
            self.name,
            self.train_images.to(device),
            self.train_labels.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
            self.augmentation,
        )

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random training mini-batch, not class balanced (WarpGrad Appendix E).

        Indices are drawn without replacement within the batch (independently
        across calls; a batch larger than the split concatenates permutations)
        with ``generator`` (a CPU generator; ``None`` = global RNG). With
        ``augment`` (and an ``augmentation``) each image gets its own random
        affine map; the test split is never augmented.

        Returns:
            ``x (batch_size, C, H, W)``, ``y (batch_size,)`` on the task's device.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = _draw_indices(self.train_images.shape[0], batch_size, generator).to(self.device)
        x, y = self.train_images[idx], self.train_labels[idx]
        if augment and self.augmentation is not None:
            x = random_affine(x, generator, **self.augmentation)
        return x, y

    def loader(
        self, batch_size: int, generator: torch.Generator | None = None, augment: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite iterator of :meth:`sample` batches."""
        while True:
            yield self.sample(batch_size, generator, augment)

    @staticmethod
    def _batches(x: torch.Tensor, y: torch.Tensor, bs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, x.shape[0], bs):
            yield x[i : i + bs], y[i : i + bs]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out test split in order, un-augmented, in batches."""
        return self._batches(self.test_images, self.test_labels, batch_size)

    def train_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training split in order, un-augmented (for evaluation), in batches."""
        return self._batches(self.train_images, self.train_labels, batch_size)

    def __repr__(self) -> str:
        return (
            f"ClassificationTask({self.name!r}, train={tuple(self.train_images.shape)}, "
            f"test={tuple(self.test_images.shape)}, device={self.device})"
        )
