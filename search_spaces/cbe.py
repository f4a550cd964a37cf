"""CBE search spaces: thresholds (2 or 3 experts), open ratio and num_learnable per expert, and
the calibration variants.

Values are plain strings / numbers so Optuna can search them as categoricals and MLflow and the
report show them as they are; ``ray_lt.recipes.cbe.cbe_from_config`` reads the keys made here.
Experts whose settings did not change keep their stage key, so a search reuses them from the
store and retrains only the experts it changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import tune

from ray_lt.recipes.cbe import splits_from_thresholds

THRESHOLDS = ("20,100", "20,50", "10,100", "20", "100")  # three or two experts
OPEN_RATIOS = (4.0, 8.0, 16.0, 32.0)
NUM_LEARNABLE = (-1, 1, 2, 3)
CALIBRATIONS = ("full", "prior", "none")


def thresholds(choices: Sequence[str] = THRESHOLDS) -> dict[str, Any]:
    """The split boundaries, e.g. "20,100" (3 experts) or "20" (2 experts)."""
    for text in choices:
        splits_from_thresholds(text)  # malformed thresholds fail here, by name
    return {"thresholds": tune.choice(list(choices))}


def open_ratio(choices: Sequence[float] = OPEN_RATIOS, experts: int = 3) -> dict[str, Any]:
    """One open ratio per expert (``open_ratio_0`` is the many-shot expert's)."""
    if any(r <= 0 for r in choices):
        raise ValueError(f"open ratios must be > 0, got {list(choices)}")
    return {f"open_ratio_{k}": tune.choice(list(choices)) for k in range(experts)}


def num_learnable(choices: Sequence[int] = NUM_LEARNABLE, experts: int = 3) -> dict[str, Any]:
    """One num_learnable per expert (-1 all, 1 classifier, k: classifier + k - 1 stages)."""
    return {f"num_learnable_{k}": tune.choice(list(choices)) for k in range(experts)}


def calibration(choices: Sequence[str] = CALIBRATIONS) -> dict[str, Any]:
    """Calibration on ("full"), off ("none") or the prior offset only ("prior")."""
    return {"calibration": tune.choice(list(choices))}


def seeds(n: int = 3, first: int = 0) -> tuple[int, ...]:
    """Seeds for ``Experiment(seeds=...)``: generalist, experts and calibration share the seed."""
    return tuple(range(first, first + n))
