"""Pareto ranking of objective vectors: non-dominated sorting, crowding distance, and the
MO-ASHA rung rule built on them (``moasha.py``).

Each objective has a mode, "max" or "min"; a point dominates another when it is at least as
good on every objective and better on one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Point = Sequence[float]


def _oriented(points: Sequence[Point], modes: Sequence[str]) -> np.ndarray:
    """The points as an (n, m) array in which larger is better on every objective."""
    arr = np.asarray(points, dtype=float).reshape(len(points), -1)
    if arr.shape[1] != len(modes):
        raise ValueError(f"each point needs {len(modes)} values (one per mode)")
    signs = np.array([1.0 if mode == "max" else -1.0 for mode in modes])
    return arr * signs


def _dominance(arr: np.ndarray) -> np.ndarray:
    """``dom[i, j]``: point i is at least as good as j everywhere and better somewhere."""
    at_least = (arr[:, None, :] >= arr[None, :, :]).all(axis=-1)
    better = (arr[:, None, :] > arr[None, :, :]).any(axis=-1)
    return at_least & better


def non_dominated_sort(points: Sequence[Point], modes: Sequence[str]) -> list[list[int]]:
    """Indices of ``points`` split into Pareto fronts F1, F2, ... (each in ascending order).

    F1 holds the points no other point dominates; F2 those dominated only by F1, and so on.
    Equal points never dominate each other, so they share a front. Values must be finite.
    """
    if not points:
        return []
    dom = _dominance(_oriented(points, modes))
    dominated_by = dom.sum(axis=0)  # how many points dominate each point
    remaining = np.ones(len(points), dtype=bool)
    fronts: list[list[int]] = []
    while remaining.any():
        front = np.flatnonzero(remaining & (dominated_by == 0))
        fronts.append(front.tolist())
        remaining[front] = False
        dominated_by = dominated_by - dom[front].sum(axis=0)
    return fronts


def crowding_distance(points: Sequence[Point]) -> list[float]:
    """NSGA-II crowding distance of each point within ``points`` (one front).

    Per objective, a point at the smallest or largest value gets infinity (it bounds the front),
    and an inner point gets the gap between the nearest distinct values below and above it,
    divided by the objective's range; the objectives' shares are summed. Neighbours are taken
    among distinct values so equal points get equal distances (arrival order breaks that tie
    later), and an objective with no spread adds nothing. Direction (max/min) does not matter.
    """
    if not points:
        return []
    arr = np.asarray(points, dtype=float).reshape(len(points), -1)
    dist = np.zeros(len(points))
    for column in arr.T:
        distinct = np.unique(column)  # sorted
        if len(distinct) < 2:
            continue
        pos = np.searchsorted(distinct, column)
        lower = distinct[np.maximum(pos - 1, 0)]
        upper = distinct[np.minimum(pos + 1, len(distinct) - 1)]
        share = (upper - lower) / (distinct[-1] - distinct[0])
        share[(pos == 0) | (pos == len(distinct) - 1)] = np.inf
        dist += share
    return dist.tolist()


def keep_count(n: int, reduction_factor: float) -> int:
    """How many of ``n`` trials at a rung continue by rank: the top ``1 / reduction_factor``,
    rounded down (0 below ``reduction_factor`` trials, where only the first front continues)."""
    return math.floor(n / reduction_factor + 1e-9)


def _top_ranked(points: Sequence[Point], fronts: list[list[int]], k: int) -> set[int]:
    """The ``k`` best indices: whole fronts in order, then the cut front by crowding distance
    (larger first) and index (earlier arrival first)."""
    chosen: list[int] = []
    for front in fronts:
        room = k - len(chosen)
        if room <= 0:
            break
        if len(front) <= room:
            chosen.extend(front)
            continue
        crowd = crowding_distance([points[i] for i in front])
        order = sorted(range(len(front)), key=lambda j: (-crowd[j], front[j]))
        chosen.extend(front[j] for j in order[:room])
    return set(chosen)


def rung_decision(
    recorded_points: Sequence[Point],
    new_point: Point,
    modes: Sequence[str],
    reduction_factor: float,
) -> bool:
    """Whether a trial reaching a rung with ``new_point`` continues, given the points recorded
    there before it (in arrival order). Non-dominated points always continue; the others only
    if ranked within ``keep_count`` of all the rung's points, the new one included."""
    points = [*recorded_points, new_point]
    new = len(points) - 1
    fronts = non_dominated_sort(points, modes)
    if new in fronts[0]:
        return True
    return new in _top_ranked(points, fronts, keep_count(len(points), reduction_factor))
