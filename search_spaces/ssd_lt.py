"""SSD-LT search spaces: stage I's SSL weight and queue size, stage III's KD weight and T.

Each function returns Tune domains keyed by the ``ray_lt.recipes.ssd_lt.ssd_lt`` keyword they set,
so an experiment's pipeline can pass a sampled config straight through. Queue sizes must be
multiples of the batch and fit the training set; ``queue_sizes`` builds only such values, and a
bad one stops the sweep on the driver (``ssd_feature.validate``) before any trial runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import tune

from ray_lt.errors import ConfigError


def ssl_weight(weights: Sequence[float] = (0.0, 0.5, 1.0, 2.0), *, grid: bool = False) -> Any:
    """lambda, the CE : SSL = 1 : lambda weight of stage I (0 is the CE-only ablation)."""
    values = list(weights)
    return tune.grid_search(values) if grid else tune.choice(values)


def temperature(values: Sequence[float] = (1.0, 2.0, 4.0), *, grid: bool = False) -> Any:
    """KD temperature T of stage III (SSD-LT's code: 2)."""
    return tune.grid_search(list(values)) if grid else tune.choice(list(values))


def kd_weight(values: Sequence[float] = (0.0, 0.5, 1.0, 2.0), *, grid: bool = False) -> Any:
    """KD weight of stage III (CE : KD = 1 : kd_weight; 0 turns KD and the soft head off)."""
    return tune.grid_search(list(values)) if grid else tune.choice(list(values))


def queue_sizes(
    n_train: int, batch_size: int, fractions: Sequence[float] = (0.25, 0.5, 1.0)
) -> list[int]:
    """Valid queue sizes: the given fractions of the training set, rounded down to whole batches.

    Args:
        n_train: training images (10,847 for CIFAR-100-LT IF100).
        batch_size: stage I's global batch.
        fractions: of the largest valid queue, each in (0, 1].
    """
    batches = n_train // batch_size
    if batches < 1 or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(
            f"queue sizes need n_train ({n_train}) >= batch_size ({batch_size}) and fractions "
            f"in (0, 1], got {list(fractions)}"
        )
    return sorted({max(1, int(batches * f)) * batch_size for f in fractions})


def queue_size(n_train: int = 10_847, batch_size: int = 128, *, grid: bool = False) -> Any:
    """Stage I's queue size over ``queue_sizes`` (CIFAR-100-LT IF100 at batch 128 by default)."""
    values = queue_sizes(n_train, batch_size)
    return tune.grid_search(values) if grid else tune.choice(values)
