"""CBD search spaces: teacher subsets of a named pool and the projection width.

A subset is one string, the teacher names joined by "+" ("vanilla1+data_aug2"), so Optuna can
search it as a plain categorical and MLflow and the report show it as one readable value.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from ray import tune

from ray_lt.recipes import TEACHER_POOL, parse_teacher


def teacher_subsets(pool: Sequence[str] = TEACHER_POOL, min_size: int = 1) -> list[str]:
    """Every subset of ``pool`` with at least ``min_size`` teachers, smallest first."""
    for name in pool:
        parse_teacher(name)  # unknown names fail here, with the list of valid ones
    return [
        "+".join(combo)
        for size in range(min_size, len(pool) + 1)
        for combo in itertools.combinations(pool, size)
    ]


def teachers(pool: Sequence[str] = TEACHER_POOL, *, grid: bool = False) -> Any:
    """The subset choice: a grid over every subset, or a categorical Optuna can search."""
    subsets = teacher_subsets(pool)
    return tune.grid_search(subsets) if grid else tune.choice(subsets)


def projection(widths: Sequence[int | None] = (None, 128, 256)) -> dict[str, Any]:
    """Student projection width (``None``: the teachers' concatenated width, as in the paper).

    With distillation (alpha > 0) the width must equal the concatenated teacher width, so widths
    other than None suit class-balanced training from scratch (alpha = 0) or a matching teacher
    set; any other combination stops the sweep before it starts, naming the width to use.
    """
    return {"proj_dim": tune.choice(list(widths))}


def seeds(n: int = 3, first: int = 0) -> tuple[int, ...]:
    """Seeds for ``Experiment(seeds=...)``: the student's seed; teachers carry their own."""
    return tuple(range(first, first + n))
