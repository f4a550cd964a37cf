"""What a dataset is (``DataSpec``), what loading one gives (``LTDataset``), and the one way in.

Every stage names its data with a frozen, JSON-serialisable ``DataSpec`` so that the spec can enter
the stage-key hash; ``load_dataset`` is the only loader and looks the spec's name up in
``DATASETS``. Loaded datasets are plain uint8 NumPy arrays (small long-tailed datasets live on the
accelerator as one tensor, docs/data.md); this module must not know about any one dataset's file
format.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_lt.errors import ConfigError
from ray_lt.registry import Registry

#: Environment variable naming the data root when no root is passed.
DATA_ROOT_ENV = "RAY_LT_DATA"
#: How many loaded datasets ``load_dataset`` keeps in memory (decoding PNGs costs seconds).
CACHE_SIZE = 4
#: Where a dataset's pixels live while a stage trains (``DataSpec.placement``).
PLACEMENTS = ("auto", "device", "stream")
# DataSpec fields added after stores existed: hashed into a key only when not at the default.
_LATER_FIELDS = {"image_size": 224, "placement": "auto", "many_inclusive": False}


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, which long-tail profile and which seed; hashable and JSON-serialisable.

    ``num_classes``, ``max_per_class`` and ``test_per_class`` apply to ``synthetic_lt`` only:
    CIFAR fixes them (10 or 100 classes, n_max 5000 or 500, the official balanced test set).
    ``image_size`` (the crop fed to the model) and ``placement`` apply to the JPEG datasets read
    from split lists (``imagenet_lt``, ``places_lt``, ``inat18``): ``placement="auto"`` keeps a
    dataset on the device when its pixels at ``image_size`` fit ``DEVICE_BYTES_LIMIT`` and streams
    it through Ray Data otherwise; ``"device"`` or ``"stream"`` force the choice.
    ``many_inclusive`` counts a class with exactly 100 training images as many-shot (CBE's
    rule) instead of medium (the usual one); it changes only the reported shot groups, but it
    enters the stage key because a stage's artifact stores its metrics.
    """

    name: str = "synthetic_lt"
    imbalance: float = 100.0
    seed: int = 0
    num_classes: int = 10
    max_per_class: int = 500
    test_per_class: int = 100
    val_per_class: int = 20
    image_size: int = 224
    placement: str = "auto"
    many_inclusive: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"DataSpec.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.imbalance, bool) or not isinstance(self.imbalance, int | float):
            raise ConfigError(f"DataSpec.imbalance must be a number, got {self.imbalance!r}")
        if not self.imbalance > 0:
            raise ConfigError(
                f"DataSpec.imbalance must be > 0 (n_max / n_min, e.g. 100), got {self.imbalance!r}"
            )
        object.__setattr__(self, "imbalance", float(self.imbalance))
        minimum = {
            "seed": 0,
            "num_classes": 2,
            "max_per_class": 1,
            "test_per_class": 0,
            "val_per_class": 0,
        }
        for key, low in minimum.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"DataSpec.{key} must be an integer >= {low}, got {value!r}; fix the data spec"
                )
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ConfigError(f"DataSpec.image_size must be an integer, got {self.image_size!r}")
        if not 8 <= self.image_size <= 1024:
            raise ConfigError(
                f"DataSpec.image_size must be in 8..1024 pixels (224 for ImageNet recipes), "
                f"got {self.image_size}"
            )
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"DataSpec.placement must be one of {', '.join(PLACEMENTS)}, got "
                f"{self.placement!r}"
            )
        if not isinstance(self.many_inclusive, bool):
            raise ConfigError(
                f"DataSpec.many_inclusive must be True or False, got {self.many_inclusive!r}"
            )
        if self.seed >= 2**32:
            raise ConfigError(f"DataSpec.seed must be < 2**32 (a NumPy seed), got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict (the inverse of :meth:`from_dict`).

        Fields added after stores existed are left out at their defaults, so the stage keys of
        every spec that does not set them stay what they were.
        """
        d = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        """Build a spec from a dict; an unknown key is a ``ConfigError`` naming the valid ones.

        Args:
            d: field name to value, e.g. ``{"name": "cifar100_lt", "imbalance": 100}``.
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown DataSpec key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(valid)}"
            )
        return cls(**d)


@dataclass
class Split:
    """One split: uint8 NCHW images, int64 labels and each image's row in its source file.

    ``images`` may instead be float32 rows ``[N, ...]`` (precomputed features or logits): the
    engine then feeds them to the model as they are, with no augmentation or normalisation. Or it
    may be a 1-D unicode array of image paths (relative to ``LTDataset.image_root``): a streamed
    split, decoded batch by batch on CPU workers (``ray_lt.data.sources``), never loaded whole.
    Objectives that take row subsets (``images[rows]``) work the same on all three.
    """

    images: np.ndarray
    labels: np.ndarray
    source_index: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.dtype == np.uint8:
            assert self.images.ndim == 4 and self.images.shape[1] == 3, self.images.shape
        elif self.images.dtype.kind == "U":  # image paths of a streamed split
            assert self.images.ndim == 1, self.images.shape
        else:  # precomputed float inputs (features or logits, e.g. CBE's calibration)
            assert self.images.dtype == np.float32 and self.images.ndim >= 2, self.images.dtype
        assert self.images.shape[0] == n, (self.images.shape, n)
        assert self.images.flags.c_contiguous
        assert self.labels.dtype == np.int64 and self.source_index.dtype == np.int64
        assert self.source_index.shape == (n,), (self.source_index.shape, n)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streamed(self) -> bool:
        """Whether ``images`` holds paths to decode on the fly rather than pixels."""
        return self.images.dtype.kind == "U"

    @classmethod
    def empty(cls, height: int = 32, width: int = 32) -> Split:
        """A split with no images (e.g. a validation split that cannot be drawn)."""
        return cls(
            images=np.zeros((0, 3, height, width), dtype=np.uint8),
            labels=np.zeros(0, dtype=np.int64),
            source_index=np.zeros(0, dtype=np.int64),
        )


@dataclass
class LTDataset:
    """A loaded long-tailed dataset. Shared through a cache: treat the arrays as read-only."""

    name: str
    num_classes: int
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Set by a view whose train rows are not the dataset's training images (CBE's calibration
    # trains on validation logits): its shot groups must still come from the real counts.
    train_counts: np.ndarray | None = None
    # Streamed splits: the folder their relative paths hang off (shared storage on a cluster,
    # the same path on every node) and the square crop decoded for the model.
    image_root: str = ""
    image_size: int = 0
    # The shot-group rule of ``DataSpec.many_inclusive``, for the metrics of every stage on it.
    many_inclusive: bool = False

    @property
    def class_counts(self) -> np.ndarray:
        """Training images per class, int64 [num_classes] (``train_counts`` when set)."""
        if self.train_counts is not None:
            return np.asarray(self.train_counts, dtype=np.int64)
        return np.bincount(self.train.labels, minlength=self.num_classes).astype(np.int64)


DATASETS = Registry[Callable[[DataSpec, str | None], LTDataset]]("dataset")

_cache: OrderedDict[tuple[DataSpec, str | None], LTDataset] = OrderedDict()
_cache_lock = threading.Lock()


def resolve_root(root: str | os.PathLike[str] | None) -> str | None:
    """The data root to use: ``root`` if given, else ``$RAY_LT_DATA``, else None; made absolute.

    Args:
        root: a folder path, or None to use the environment variable.
    """
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV) or None
    if root is None:
        return None
    return str(Path(root).expanduser().resolve())


def load_dataset(spec: DataSpec, root: str | os.PathLike[str] | None = None) -> LTDataset:
    """Load the dataset a spec names; the last few loads are cached in this process.

    Args:
        spec: which dataset (``spec.name`` is a ``DATASETS`` key) and its long-tail profile.
        root: folder holding the data files; defaults to ``$RAY_LT_DATA``. Ignored by
            ``synthetic_lt``.

    Example:
        >>> ds = load_dataset(DataSpec("synthetic_lt", imbalance=10, max_per_class=50))
        >>> int(ds.class_counts[0]), int(ds.class_counts[-1])
        (50, 5)
    """
    if not isinstance(spec, DataSpec):
        raise ConfigError(f"load_dataset needs a DataSpec, got {type(spec).__name__}")
    builder = DATASETS.get(spec.name)
    key = (spec, resolve_root(root))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    dataset = builder(spec, key[1])
    if spec.many_inclusive:
        dataset = dataclasses.replace(dataset, many_inclusive=True)
    if spec.placement == "stream" and not dataset.train.streamed:
        raise ConfigError(
            f"dataset '{spec.name}' is decoded in memory and cannot stream; placement='stream' "
            "applies to the JPEG datasets (imagenet_lt, places_lt, inat18): use 'auto' or 'device'"
        )
    with _cache_lock:
        _cache[key] = dataset
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return dataset


def clear_cache() -> None:
    """Forget every cached dataset (tests, or to free memory)."""
    with _cache_lock:
        _cache.clear()
