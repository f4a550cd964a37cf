"""Optimiser search spaces: learning rate and weight decay on log scales."""

from __future__ import annotations

from typing import Any

from ray import tune


def lr_wd(
    lr: tuple[float, float] = (0.01, 0.5), wd: tuple[float, float] = (1e-5, 1e-3)
) -> dict[str, Any]:
    """``lr`` and ``weight_decay`` drawn log-uniformly between the given bounds."""
    return {"lr": tune.loguniform(*lr), "weight_decay": tune.loguniform(*wd)}
