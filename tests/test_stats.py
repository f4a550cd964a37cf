"""ray_lt.stats on hand-computed cases: the arithmetic is in the comments, scipy is used here only
for a t quantile's tail probability (``t.sf``), never for the statistic under test."""

from __future__ import annotations

import math

import pytest
from scipy import stats as st

from ray_lt.stats import MARKS_LEGEND, Comparison, compare, mean_ci, significance_mark

TOL = 1e-6


def test_mean_ci_three_values():
    # [0.40, 0.42, 0.44]: mean 0.42; deviations -0.02, 0, 0.02 -> var (4e-4 + 4e-4) / 2 = 4e-4,
    # std 0.02; t_{0.975,2} = 4.302653 (table); half-width 4.302653 * 0.02 / sqrt(3) = 0.049683
    n, mean, std, lo, hi = mean_ci([0.40, 0.42, 0.44])
    assert n == 3
    assert mean == pytest.approx(0.42, abs=TOL) and std == pytest.approx(0.02, abs=TOL)
    assert lo == pytest.approx(0.42 - 0.049683, abs=TOL)
    assert hi == pytest.approx(0.42 + 0.049683, abs=TOL)


def test_mean_ci_two_values_and_level():
    # [0.3, 0.5]: mean 0.4; std sqrt((0.01 + 0.01) / 1) = 0.141421; t_{0.975,1} = 12.706205;
    # half-width 12.706205 * 0.141421 / sqrt(2) = 12.706205 * 0.1 = 1.2706205
    n, mean, std, lo, hi = mean_ci([0.3, 0.5])
    assert (n, mean) == (2, pytest.approx(0.4, abs=TOL))
    assert std == pytest.approx(0.141421, abs=TOL)
    assert (lo, hi) == (pytest.approx(0.4 - 1.2706205, abs=TOL), pytest.approx(1.6706205))
    # 90%: t_{0.95,2} = 2.919986; half-width 2.919986 * 0.02 / sqrt(3) = 0.033717
    _, _, _, lo, hi = mean_ci([0.40, 0.42, 0.44], level=0.90)
    assert (lo, hi) == (pytest.approx(0.386283, abs=TOL), pytest.approx(0.453717, abs=TOL))
    with pytest.raises(ValueError, match="level"):
        mean_ci([0.1, 0.2], level=95)


def test_mean_ci_ignores_nan_and_inf():
    # the same three finite values as above, a NaN and an inf ignored: the same interval
    n, mean, std, lo, hi = mean_ci([0.40, math.nan, 0.42, math.inf, 0.44])
    assert n == 3 and mean == pytest.approx(0.42, abs=TOL) and std == pytest.approx(0.02)
    assert (lo, hi) == (pytest.approx(0.370317, abs=TOL), pytest.approx(0.469683, abs=TOL))


def test_mean_ci_one_value_has_no_interval():
    # n = 1: the mean is the value; no spread, so no std and no interval (NaN, not 0)
    n, mean, std, lo, hi = mean_ci([math.nan, 0.5])
    assert (n, mean) == (1, 0.5)
    assert math.isnan(std) and math.isnan(lo) and math.isnan(hi)
    n, *rest = mean_ci([math.nan])
    assert n == 0 and all(math.isnan(x) for x in rest)
    assert mean_ci([])[0] == 0


def test_welch_by_hand():
    # row [0.50, 0.54, 0.58]: mean 0.54, var 0.0016; base [0.40, 0.42, 0.44]: mean 0.42,
    # var 0.0004. se^2 = 0.0016/3 + 0.0004/3 = 0.00066667, se = 0.0258199;
    # t = 0.12 / 0.0258199 = 4.647580;
    # df = se^4 / ((0.0016/3)^2/2 + (0.0004/3)^2/2) = 4.44444e-7 / 1.51111e-7 = 50/17
    t = 0.12 / math.sqrt(0.0016 / 3 + 0.0004 / 3)
    assert t == pytest.approx(4.647580, abs=TOL)
    p = 2 * st.t.sf(t, 50 / 17)  # 0.019620
    got = compare([0.50, 0.54, 0.58], [0.40, 0.42, 0.44])
    assert got.test == "welch" and got.delta == pytest.approx(0.12, abs=TOL)
    assert got.p == pytest.approx(p, abs=TOL) and got.p == pytest.approx(0.019620, abs=TOL)
    assert significance_mark(got.p) == "*"


def test_paired_differs_from_welch():
    # seeds 0, 1, 2: base [0.40, 0.45, 0.50], row [0.42, 0.471, 0.519]
    # differences 0.02, 0.021, 0.019: mean 0.02, sd sqrt((0 + 1e-6 + 1e-6) / 2) = 0.001;
    # t = 0.02 / (0.001 / sqrt(3)) = 34.641016, df 2
    t = 0.02 / (0.001 / math.sqrt(3))
    assert t == pytest.approx(34.641016, abs=TOL)
    p = 2 * st.t.sf(t, 2)  # 0.000832
    base, row = [0.40, 0.45, 0.50], [0.42, 0.471, 0.519]
    # the row's seeds come in another order: values are matched by seed, not by position
    got = compare(row[::-1], base, ["2", "1", "0"], ["0", "1", "2"])
    assert got == Comparison("paired", pytest.approx(p, abs=TOL), pytest.approx(0.02, abs=TOL))
    assert significance_mark(got.p) == "***"
    # Welch on the same numbers: row var ((-0.05)^2 + 0.001^2 + 0.049^2) / 2 = 0.002451,
    # base var 0.0025; se sqrt(0.002451/3 + 0.0025/3) = 0.040624; t = 0.02 / 0.040624 = 0.4923
    # and the seed noise both rows share hides the gain: p ~ 0.65, no mark
    welch = compare(row, base)
    assert welch.test == "welch" and 0.6 < welch.p < 0.7 and significance_mark(welch.p) == ""


def test_paired_only_for_the_same_seed_set():
    base, row = [0.40, 0.45, 0.50], [0.42, 0.471, 0.519]
    assert compare(row, base, ["0", "1", "3"], ["0", "1", "2"]).test == "welch"
    assert compare(row, base, ["0", "1", "2"], None).test == "welch"
    assert compare(row, base, ["0", "0", "1"], ["0", "1", "2"]).test == "welch"
    # a NaN on one side changes the set of seeds with a value: Welch over the finite ones
    nan_row = [math.nan, 0.471, 0.519]
    got = compare(nan_row, base, ["0", "1", "2"], ["0", "1", "2"])
    assert got.test == "welch" and got.delta == pytest.approx(0.495 - 0.45, abs=TOL)
    # a NaN on both sides at the same seed: still paired, over seeds 1 and 2
    # differences 0.021, 0.019: mean 0.02, sd sqrt(2e-6 / 1) = 0.0014142; t = 0.02 / 0.001 = 20
    got = compare(nan_row, [math.nan, 0.45, 0.50], ["0", "1", "2"], ["0", "1", "2"])
    assert got.test == "paired" and got.p == pytest.approx(2 * st.t.sf(20.0, 1), abs=TOL)
    with pytest.raises(ValueError, match="row_seeds has 2 seeds for 3 values"):
        compare(row, base, ["0", "1"], ["0", "1", "2"])


def test_identical_and_constant_rows():
    # identical rows: delta 0; Welch's t = 0 / se = 0, p = 1; paired differences all 0, a 0/0 t
    # that scipy returns as NaN: decided as p = 1.0 (no evidence of a difference, no mark)
    vals, seeds = [0.40, 0.42, 0.44], ["0", "1", "2"]
    assert compare(vals, vals) == Comparison("welch", pytest.approx(1.0), 0.0)
    assert compare(vals, vals, seeds, seeds) == Comparison("paired", 1.0, 0.0)
    # both rows constant and equal: Welch 0/0, decided as p = 1.0
    assert compare([0.5, 0.5], [0.5, 0.5, 0.5]) == Comparison("welch", 1.0, 0.0)
    # both constant and different: t = ±inf, p = 0.0 (the limit as the noise goes to 0)
    got = compare([0.5, 0.5], [0.4, 0.4])
    assert got.test == "welch" and got.p == 0.0 and got.delta == pytest.approx(0.1)
    # paired differences constant but for float rounding (1.01 - 1 != 2.01 - 2 in binary):
    # a constant offset, p = 0.0, not scipy's 5e-29 from a rounding-noise variance
    got = compare([1.01, 2.01, 3.01], [1.0, 2.0, 3.0], seeds, seeds)
    assert got.test == "paired" and got.p == 0.0 and got.delta == pytest.approx(0.01)
    assert significance_mark(got.p) == "***"


def test_too_few_values_is_no_test():
    # n = 1 on a side: no variance to test with; delta still the difference of the means:
    # 0.5 - (0.4 + 0.5) / 2 = 0.05
    got = compare([0.5, math.nan], [0.4, 0.5], ["0", "1"], ["0", "1"])
    assert got.test == "none" and math.isnan(got.p) and got.delta == pytest.approx(0.05)
    got = compare([math.nan, math.nan], [0.4, 0.5])
    assert got.test == "none" and math.isnan(got.p) and math.isnan(got.delta)


def test_significance_marks():
    cases = {0.0: "***", 0.0009: "***", 0.001: "**", 0.0099: "**", 0.01: "*", 0.049: "*"}
    cases |= {0.05: "", 0.5: "", 1.0: "", math.nan: ""}
    for p, mark in cases.items():
        assert significance_mark(p) == mark, p
    assert MARKS_LEGEND == "* p < 0.05, ** p < 0.01, *** p < 0.001"
