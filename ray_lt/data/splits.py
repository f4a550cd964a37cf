"""Long-tail profiles, the literature's seeded subset selection, validation draws and shot splits.

These are the numbers every table depends on, so they live in one place, as pure functions of
labels and seeds, shared by every dataset: the exponential profile and the selection follow
LDAM-DRW's ``IMBALANCECIFAR`` to the index (docs/data.md), and the shot groups come from
``ray_lt.metrics`` so that data and evaluation can never disagree. No global random state.
"""

from __future__ import annotations

import warnings

import numpy as np

from ray_lt.errors import ConfigError, DataError
from ray_lt.metrics import FEW, GROUP_NAMES, MANY, MEDIUM, shot_groups

#: Mixed into the validation seed so its stream is independent of the LT selection's.
_VAL_STREAM = 0x5A11D


def lt_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images per class of the exponential profile: ``int(n_max * (1/IF) ** (i / (C - 1)))``.

    Args:
        n_max: images of class 0 (the head).
        num_classes: C, at least 2.
        imbalance: IF = n_max / n_min, > 0 (1 gives a balanced set).
    """
    if num_classes < 2:
        raise ConfigError(f"a long-tail profile needs at least 2 classes, got {num_classes}")
    if n_max < 1:
        raise ConfigError(f"n_max must be >= 1, got {n_max}")
    if not imbalance > 0:
        raise ConfigError(f"imbalance factor must be > 0 (e.g. 100), got {imbalance!r}")
    ratio = 1.0 / imbalance
    counts = [int(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if min(counts) < 1:
        raise ConfigError(
            f"imbalance {imbalance!r} with n_max {n_max} leaves the last class with "
            f"{min(counts)} images; use an imbalance factor <= {n_max}"
        )
    return counts


def select_lt_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Source rows of the long-tailed subset, class-major, exactly as the literature selects them.

    Equivalent to ``np.random.seed(seed)`` then, for each class c in increasing order,
    ``idx = np.where(labels == c)[0]; np.random.shuffle(idx); keep idx[:counts[c]]`` — but with a
    private ``RandomState`` (same stream), so global state is untouched.

    Args:
        labels: class of every row of the full (balanced) train file, in file order.
        counts: images to keep per class (e.g. from :func:`lt_counts`).
        seed: the selection seed; 0 reproduces the subset the literature trains on.
    """
    labels = np.asarray(labels)
    rs = np.random.RandomState(seed)
    chosen = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if len(idx) < n:
            raise DataError(
                f"class {c} has {len(idx)} train images but the profile needs {n}; "
                "check the label column or use an imbalance factor >= 1"
            )
        rs.shuffle(idx)
        chosen.append(idx[:n])
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)


def draw_val_indices(
    labels: np.ndarray, exclude: np.ndarray, per_class: int, num_classes: int, seed: int = 0
) -> np.ndarray:
    """Source rows of a validation split: ``per_class`` rows per class not in ``exclude``.

    A class with fewer unselected rows gives what it has, with a warning (CIFAR-LT's class 0
    keeps all its train images, so it has none to give).

    Args:
        labels: class of every row of the full train file.
        exclude: rows already used (the long-tailed train subset).
        per_class: rows to draw per class.
        num_classes: C; classes are visited in increasing order.
        seed: seed of a generator separate from the selection's.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, _VAL_STREAM])
    free = np.ones(len(labels), dtype=bool)
    free[np.asarray(exclude, dtype=np.int64)] = False
    chosen, short = [], []
    for c in range(num_classes):
        pool = np.where(free & (labels == c))[0]
        take = min(per_class, len(pool))
        if take < per_class:
            short.append(f"{c} ({len(pool)})")
        chosen.append(np.sort(rng.choice(pool, size=take, replace=False)))
    if short and per_class > 0:
        warnings.warn(
            f"validation split: {len(short)} class(es) have fewer than {per_class} unselected "
            f"train images and get what they have: class (available) {', '.join(short[:10])}",
            RuntimeWarning,
            stacklevel=2,
        )
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)


def shot_split(
    train_counts: np.ndarray, many_threshold: int = 100, few_threshold: int = 20
) -> dict[str, np.ndarray]:
    """Class indices of the many / medium / few shot groups (``ray_lt.metrics.shot_groups``).

    Args:
        train_counts: training images per class, shape [C].
        many_threshold: a class with more images than this is many-shot.
        few_threshold: a class with fewer images than this is few-shot.
    """
    groups = shot_groups(np.asarray(train_counts), many_threshold, few_threshold)
    return {
        name: np.flatnonzero(groups == gid).astype(np.int64)
        for name, gid in zip(GROUP_NAMES, (MANY, MEDIUM, FEW), strict=True)
    }
