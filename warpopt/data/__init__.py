"""Data layer: Omniglot (multi-shot and few-shot protocols; fetching its official archives on
request), episodic sampling, miniImageNet / tieredImageNet class pools and batched torch image
transforms."""

from .download import OMNIGLOT_ARCHIVES, download_omniglot
from .episodes import ClassificationTask, ClassPool, Episode, EpisodeSampler, TensorClassPool, episode_seed
from .imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MiniImageNetCSV,
    MiniImageNetPickle,
    TieredImageNet,
    load_miniimagenet,
    load_tieredimagenet,
)
from .omniglot import (
    AUGMENTATION,
    VINYALS_VAL_ALPHABETS,
    Omniglot,
    OmniglotRotationPool,
    load_omniglot,
    multishot_split,
    vinyals_split,
)
from .transforms import affine_matrices, pil_resize, random_affine, resize

__all__ = [
    "AUGMENTATION",
    "OMNIGLOT_ARCHIVES",
    "ClassPool",
    "ClassificationTask",
    "Episode",
    "EpisodeSampler",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MiniImageNetCSV",
    "MiniImageNetPickle",
    "Omniglot",
    "OmniglotRotationPool",
    "TensorClassPool",
    "TieredImageNet",
    "VINYALS_VAL_ALPHABETS",
    "affine_matrices",
    "download_omniglot",
    "episode_seed",
    "load_miniimagenet",
    "load_omniglot",
    "load_tieredimagenet",
    "multishot_split",
    "pil_resize",
    "random_affine",
    "resize",
    "vinyals_split",
]
