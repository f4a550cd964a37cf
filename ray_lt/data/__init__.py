"""Datasets, long-tail profiles, shot splits, samplers and on-device batch augmentation.

The bottom layer with ``metrics``: it imports nothing above it. Importing the package registers
every built-in dataset (``synthetic_lt``, ``cifar10_lt``, ``cifar100_lt``, ``imagenet_lt``,
``places_lt``, ``inat18``), sampler and
augmentation, so ``load_dataset`` / ``draw_epoch`` / ``augment_batch`` can find them by name.
"""

from __future__ import annotations

from ray_lt.data import cifar as _cifar  # noqa: F401  (registers cifar10_lt / cifar100_lt)
from ray_lt.data import jpeg_datasets as _jpeg  # noqa: F401  (imagenet_lt, places_lt, inat18)
from ray_lt.data import synthetic as _synthetic  # noqa: F401  (registers synthetic_lt)
from ray_lt.data.augment import AUGMENTS, augment_batch, normalize_batch
from ray_lt.data.samplers import SAMPLERS, draw_epoch
from ray_lt.data.spec import DATASETS, DataSpec, LTDataset, Split, load_dataset
from ray_lt.data.splits import lt_counts, shot_split

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "SAMPLERS",
    "DataSpec",
    "LTDataset",
    "Split",
    "augment_batch",
    "draw_epoch",
    "load_dataset",
    "lt_counts",
    "normalize_batch",
    "shot_split",
]
