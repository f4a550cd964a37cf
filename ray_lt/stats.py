"""The statistics behind a report's cells: confidence intervals and tests against a baseline.

A row of an ablation table is a handful of seeds, so "38.3 ± 0.4" alone does not say whether a
gain over the baseline is real. These pure functions give each cell its Student-t confidence
interval of the mean and a two-sided t-test against the baseline row: Welch's test (unequal
variances) in general, the paired test when both rows ran exactly the same seeds, since then
seed-to-seed noise shared by both rows (data order, initialisation) cancels out.

Conventions, chosen so that a table never prints a number the data cannot support:

* Only finite values count (a NaN is a metric a run could not compute, e.g. no few-shot class);
  ``n`` is how many are left.
* ``n < 2``: no standard deviation and no interval (NaN); on either side of a comparison, no test
  (``test="none"``, ``p`` NaN).
* No spread at all: a sample whose values are all equal (to ``_TIE`` relative tolerance, so that
  float rounding such as ``1.01 - 1`` vs ``2.01 - 2`` does not pass for seed noise) has zero
  variance and the t statistic is 0/0 or ±inf, for which scipy returns NaN or ±inf. We decide
  it explicitly, as the limit of the test when the noise goes to 0:
  equal means give ``p = 1.0`` (identical rows: no evidence of a difference, no mark) and
  different means give ``p = 0.0`` (t = ±inf, the largest mark; the seeds changed nothing, which
  the reader should check). For Welch this needs both rows constant; for the paired test the
  per-seed differences constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

# Relative tolerance under which values count as equal (see the module docstring). Metrics are
# fractions whose real granularity (1 / test images) is > 1e-7, so no real difference is lost.
_TIE = 1e-12
# (threshold, mark), strictest first: '*' p < 0.05, '**' p < 0.01, '***' p < 0.001
MARKS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
MARKS_LEGEND = "* p < 0.05, ** p < 0.01, *** p < 0.001"


@dataclass(frozen=True)
class Comparison:
    """A row against the baseline on one metric.

    Attributes:
        test: ``"welch"`` (Welch's t-test), ``"paired"`` (paired t-test over matched seeds) or
            ``"none"`` (fewer than 2 finite values on a side: no test possible).
        p: two-sided p-value; NaN when ``test == "none"``.
        delta: mean(row) - mean(baseline) over the finite values; NaN when a side has none.
    """

    test: str
    p: float
    delta: float


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr[np.isfinite(arr)]


def _constant(arr: np.ndarray) -> bool:
    """All values equal up to ``_TIE`` relative to their magnitude (at least 1)."""
    return float(np.ptp(arr)) <= _TIE * max(1.0, float(np.max(np.abs(arr))))


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= _TIE * max(1.0, abs(a), abs(b))


def mean_ci(
    values: Sequence[float], level: float = 0.95
) -> tuple[int, float, float, float, float]:
    """``(n, mean, std, lo, hi)`` of the finite values: the Student-t interval of the mean.

    The t interval (``mean ± t_{(1+level)/2, n-1} · std / √n``) rather than a normal one because
    a table row has 2-5 seeds, where the normal quantile (1.96) would understate the width by up
    to a factor 6.5. ``std`` is the sample standard deviation (ddof=1).

    Args:
        values: one metric over seeds; NaN and ±inf are ignored.
        level: coverage of the interval, in (0, 1).

    Returns:
        n (number of finite values); mean (NaN when n = 0); std (NaN when n < 2); lo and hi
        (NaN when n < 2: one value has no interval).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    arr = _finite(values)
    n = int(arr.size)
    if n == 0:
        return 0, math.nan, math.nan, math.nan, math.nan
    mean = float(arr.mean())
    if n < 2:
        return n, mean, math.nan, math.nan, math.nan
    std = float(arr.std(ddof=1))
    half = float(_st.t.ppf(0.5 + level / 2.0, n - 1)) * std / math.sqrt(n)
    return n, mean, std, mean - half, mean + half


def compare(
    row_values: Sequence[float],
    base_values: Sequence[float],
    row_seeds: Sequence[object] | None = None,
    base_seeds: Sequence[object] | None = None,
) -> Comparison:
    """Two-sided t-test of a row against the baseline row on one metric.

    The paired test (``scipy.stats.ttest_rel`` on values matched by seed) when seeds are given for
    both rows and the seeds with a finite value are the same set on both sides, without
    duplicates, at least 2 of them: the same seed gives both rows the same data order and
    initialisation, and pairing removes that shared noise. Otherwise Welch's test
    (``scipy.stats.ttest_ind(equal_var=False)``), which does not assume equal variances. Zero
    variance is decided as in the module docstring (equal: p = 1.0, different: p = 0.0).

    Args:
        row_values: the row's metric, one value per seed; non-finite values are ignored.
        base_values: the baseline's metric, likewise.
        row_seeds: the seed of each of ``row_values`` (same length), or None.
        base_seeds: the seed of each of ``base_values`` (same length), or None.
    """
    row_arr = np.asarray(row_values, dtype=np.float64).reshape(-1)
    base_arr = np.asarray(base_values, dtype=np.float64).reshape(-1)
    for seeds, arr, name in ((row_seeds, row_arr, "row"), (base_seeds, base_arr, "base")):
        if seeds is not None and len(seeds) != arr.size:
            raise ValueError(f"{name}_seeds has {len(seeds)} seeds for {arr.size} values")
    row, base = _finite(row_arr), _finite(base_arr)
    delta = float(row.mean() - base.mean()) if row.size and base.size else math.nan
    if row.size < 2 or base.size < 2:
        return Comparison("none", math.nan, delta)
    paired = _pairs(row_arr, base_arr, row_seeds, base_seeds)
    if paired is not None:
        a, b = paired
        diff = a - b
        if _constant(diff):
            return Comparison("paired", 1.0 if _same(float(diff.mean()), 0.0) else 0.0, delta)
        return Comparison("paired", float(_st.ttest_rel(a, b).pvalue), delta)
    if _constant(row) and _constant(base):
        same = _same(float(row.mean()), float(base.mean()))
        return Comparison("welch", 1.0 if same else 0.0, delta)
    return Comparison("welch", float(_st.ttest_ind(row, base, equal_var=False).pvalue), delta)


def _pairs(
    row: np.ndarray,
    base: np.ndarray,
    row_seeds: Sequence[object] | None,
    base_seeds: Sequence[object] | None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The finite values of both rows matched by seed, or None when they cannot be paired."""
    if row_seeds is None or base_seeds is None:
        return None
    r = {s: v for s, v in zip(row_seeds, row, strict=True) if math.isfinite(v)}
    b = {s: v for s, v in zip(base_seeds, base, strict=True) if math.isfinite(v)}
    dup = len(set(row_seeds)) < len(row_seeds) or len(set(base_seeds)) < len(base_seeds)
    if dup or set(r) != set(b) or len(r) < 2:
        return None
    order = list(r)
    return np.array([r[s] for s in order]), np.array([b[s] for s in order])


def significance_mark(p: float) -> str:
    """``'***'`` p < 0.001, ``'**'`` p < 0.01, ``'*'`` p < 0.05, else (and for NaN) ``''``."""
    if math.isnan(p):
        return ""
    return next((mark for limit, mark in MARKS if p < limit), "")
