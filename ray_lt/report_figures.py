"""The report's figures: Pareto front, shot-group bars, binned per-class accuracy, learning curves.

Each function draws one PNG from numbers the report already holds (rows and their statistics),
so a figure never shows a number the tables do not. Matplotlib runs on its Agg backend: a
report is written on headless machines (a cluster head, CI). Per-class accuracy is binned by
training count on a log axis, because one point per class is unreadable at 1,000 classes and
the long-tail question is how accuracy falls with the count, not which class is which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_lt.pareto import non_dominated_sort
from ray_lt.report_model import Report, ReportRow

SHOT_GROUPS = ("many", "medium", "few")
DEFAULT_BINS = 12


@dataclass(frozen=True)
class CountBin:
    """Classes whose training count lies in ``[lo, hi)`` (the last bin includes ``hi``).

    ``classes`` counts the classes with a finite accuracy, over which ``mean`` and ``std``
    (population std, 0 for one class: the spread of classes, not an estimate) are taken;
    ``center`` is the geometric mean of their counts, where the bin is drawn on a log axis.
    """

    lo: float
    hi: float
    classes: int
    mean: float
    std: float
    center: float


def bin_by_count(
    counts: Sequence[float], accuracy: Sequence[float], n_bins: int | None = None
) -> list[CountBin]:
    """Classes grouped into ``n_bins`` bins of equal width in log(count); empty bins dropped.

    Args:
        counts: training images per class (counts below 1 go to the first bin).
        accuracy: per-class accuracy, same length; NaN (a class with no test image) is skipped.
        n_bins: bins between the smallest and largest count; default ``min(12, distinct
            counts)``. All counts equal: one bin.
    """
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    acc = np.asarray(accuracy, dtype=np.float64)
    if c.shape != acc.shape:
        raise ValueError(f"counts ({c.size}) and accuracy ({acc.size}) differ in length")
    n = n_bins if n_bins is not None else min(DEFAULT_BINS, len(np.unique(c)))
    if n < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    lo, hi = float(np.log(c.min())), float(np.log(c.max()))
    if hi == lo:
        n = 1
    width = (hi - lo) / n if hi > lo else 1.0
    # the tiny offset puts a count that is exactly an edge (10 with edges 1, 10, 100) in the bin
    # that starts there, in spite of rounding in log()
    index = np.minimum(np.floor((np.log(c) - lo) / width + 1e-9).astype(int), n - 1)
    bins = []
    for i in range(n):
        inside = (index == i) & np.isfinite(acc)
        if not inside.any():
            continue
        bins.append(
            CountBin(
                lo=math.exp(lo + i * width),
                hi=math.exp(lo + (i + 1) * width) if hi > lo else math.exp(hi),
                classes=int(inside.sum()),
                mean=float(acc[inside].mean()),
                std=float(acc[inside].std()),
                center=float(np.exp(np.log(c[inside]).mean())),
            )
        )
    return bins


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png")
    _pyplot().close(fig)
    return path


def _half_ci(row: ReportRow, metric: str) -> float:
    """Half-width of the 95% interval, 0 where there is none (n < 2)."""
    lo, hi = row.ci_lo.get(metric, math.nan), row.ci_hi.get(metric, math.nan)
    return 0.0 if math.isnan(lo) or math.isnan(hi) else (hi - lo) / 2


def pareto_front(
    rows: Sequence[ReportRow], metrics: tuple[str, str], modes: tuple[str, str]
) -> tuple[list[ReportRow], list[ReportRow]]:
    """(rows on the front, rows dominated) among the rows with a finite mean on both metrics."""
    rows = [r for r in rows if all(math.isfinite(r.mean.get(m, math.nan)) for m in metrics)]
    if not rows:
        return [], []
    first = set(non_dominated_sort([[r.mean[m] for m in metrics] for r in rows], modes)[0])
    return [r for i, r in enumerate(rows) if i in first], [
        r for i, r in enumerate(rows) if i not in first
    ]


def plot_pareto(
    report: Report, metrics: tuple[str, str], modes: tuple[str, str], path: str | Path
) -> Path:
    """Mean per configuration with 95% CI bars both ways; the non-dominated ones highlighted.

    Stage rows (``--stages``) are drawn as grey triangles for reference, outside the front.
    """
    plt = _pyplot()
    front, dominated = pareto_front(report.rows, metrics, modes)
    fig, ax = plt.subplots(figsize=(7.0, 5.0), dpi=120)
    styles = (
        (dominated, dict(fmt="o", color="0.55", mfc="white", label="dominated")),
        (front, dict(fmt="o", color="tab:red", label="non-dominated (Pareto front)")),
    )
    for rows, style in styles:
        if rows:
            ax.errorbar(
                [100 * r.mean[metrics[0]] for r in rows],
                [100 * r.mean[metrics[1]] for r in rows],
                xerr=[100 * _half_ci(r, metrics[0]) for r in rows],
                yerr=[100 * _half_ci(r, metrics[1]) for r in rows],
                capsize=3,
                ms=6,
                **style,
            )
    line = sorted(front, key=lambda r: r.mean[metrics[0]])
    ax.plot(
        [100 * r.mean[metrics[0]] for r in line],
        [100 * r.mean[metrics[1]] for r in line],
        color="tab:red",
        lw=1,
        alpha=0.6,
    )
    stages = [r for r in report.stage_rows if all(r.n.get(m, 0) for m in metrics)]
    for k, r in enumerate(stages):
        xy = (100 * r.mean[metrics[0]], 100 * r.mean[metrics[1]])
        ax.plot(*xy, "^", color="0.35", label=None if k else "upstream stage (reference)")
    labelled = [*front, *stages] if len(report.rows) > 20 else [*front, *dominated, *stages]
    for r in labelled:
        xy = (100 * r.mean[metrics[0]], 100 * r.mean[metrics[1]])
        ax.annotate(r.label, xy, xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel(f"{metrics[0]} accuracy (%), mean over seeds")
    ax.set_ylabel(f"{metrics[1]} accuracy (%), mean over seeds")
    ax.set_title(f"{report.title}: {metrics[0]} vs {metrics[1]} (bars: 95% CI)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_shot_groups(report: Report, path: str | Path) -> Path:
    """Many / medium / few accuracy as grouped bars per row, with 95% CI whiskers."""
    plt = _pyplot()
    rows = report.all_rows
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5), dpi=120)
    x = np.arange(len(rows))
    width = 0.8 / len(SHOT_GROUPS)
    for i, g in enumerate(SHOT_GROUPS):
        means = [100 * r.mean.get(g, math.nan) for r in rows]
        errs = [100 * _half_ci(r, g) for r in rows]
        ax.bar(x + (i - 1) * width, np.nan_to_num(means), width, yerr=errs, capsize=2, label=g)
    ax.set_xticks(x, [_tick(r) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%), mean over seeds")
    ax.set_title(f"{report.title}: accuracy by shot group (whiskers: 95% CI)")
    ax.grid(True, axis="y", alpha=0.3)
    tops = [
        100 * v
        for r in rows
        for g in SHOT_GROUPS
        for v in (r.mean.get(g, math.nan), r.ci_hi.get(g, math.nan))
        if math.isfinite(v)
    ]
    ax.set_ylim(0, max([1.0, *tops]) * 1.2)  # room for the legend above the bars
    ax.legend(fontsize="small", ncol=len(SHOT_GROUPS), loc="upper left")
    return _save(fig, path)


def _tick(row: ReportRow) -> str:
    return f"{row.label} (stage)" if row.stage else row.label


def plot_per_class(
    report: Report, curves: dict[str, tuple], path: str | Path, n_bins: int | None = None
) -> Path:
    """Per-class accuracy binned by training count (log x): bin mean, ± std band over classes.

    Args:
        report: the report whose rows name the series.
        curves: row id -> (train_count, accuracy) arrays over classes, accuracy as fractions
            averaged over seeds.
        path: destination PNG.
        n_bins: bins per series (default: ``bin_by_count``'s).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    for row in (r for r in report.all_rows if r.config_id in curves):
        bins = bin_by_count(*curves[row.config_id], n_bins=n_bins)
        x = [b.center for b in bins]
        mean = np.array([100 * b.mean for b in bins])
        std = np.array([100 * b.std for b in bins])
        (line,) = ax.plot(x, mean, marker="o", ms=3, lw=1.2, label=_tick(row))
        ax.fill_between(
            x,
            np.clip(mean - std, 0, 100),
            np.clip(mean + std, 0, 100),
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log scale, classes binned)")
    ax.set_ylabel("per-class accuracy (%): bin mean ± std")
    ax.set_title(f"{report.title}: per-class accuracy by training count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_learning_curves(
    report: Report, curves: dict[str, dict[int, list[float]]], metric: str, path: str | Path
) -> Path:
    """The final stage's ``metric`` by epoch per row: mean over seeds, band from min to max."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    for row in (r for r in report.rows if r.config_id in curves):
        by_epoch = curves[row.config_id]
        epochs = sorted(by_epoch)
        vals = [100 * np.asarray(by_epoch[e]) for e in epochs]
        (line,) = ax.plot(
            epochs, [v.mean() for v in vals], marker="o", ms=2, lw=1.2, label=row.label
        )
        ax.fill_between(
            epochs,
            [v.min() for v in vals],
            [v.max() for v in vals],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xlabel("epoch of the final stage")
    ax.set_ylabel(f"{metric} (%): mean over seeds, band min-max")
    ax.set_title(f"{report.title}: learning curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
