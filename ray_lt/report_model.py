"""What a report is: one row per configuration with its statistics, and the report itself.

Shared by the readers (``reporting.py`` and ``report_stages.py``, MLflow runs -> rows) and the
writers (``report_tables.py``, ``report_html.py`` and ``report_figures.py``), so that a stage row
and a configuration row carry the very same statistics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ray_lt.stats import Comparison, mean_ci

DEFAULT_METRICS = ("many", "medium", "few", "overall")
PER_CLASS_ARTIFACT = "per_class.parquet"
PER_CLASS_COLUMNS = ("class", "train_count", "group", "accuracy")
CI_LEVEL = 0.95


@dataclass
class ReportRow:
    """One configuration: its runs over seeds and the statistics of each metric.

    ``n`` counts a metric's finite values (NaN runs are ignored), ``ci_lo``/``ci_hi`` bound the
    95% Student-t interval of its mean (NaN when n < 2), and ``comparison`` holds the test
    against the baseline row per metric (empty for the baseline itself and without one).
    """

    config_id: str
    label: str
    params: dict[str, str]
    seeds: list[str]
    values: dict[str, list[float]]
    mean: dict[str, float]
    std: dict[str, float]
    run_ids: list[str] = field(default_factory=list)
    n: dict[str, int] = field(default_factory=dict)
    ci_lo: dict[str, float] = field(default_factory=dict)
    ci_hi: dict[str, float] = field(default_factory=dict)
    comparison: dict[str, Comparison] = field(default_factory=dict)
    baseline: bool = False
    stage: str = ""  # the stage's kind for a stage row (``--stages``); "" for a configuration


def natural_key(text: str) -> list:
    """Sort key in which '5' < '10' and '1e-3' < '0.01' (numbers compare as numbers)."""
    parts = re.split(r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)", text)
    return [float(p) if i % 2 else p for i, p in enumerate(parts)]


def nan_stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the non-NaN values; std 0.0 for one, NaN for none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size >= 2 else 0.0)


def make_row(
    row_id: str,
    label: str,
    params: dict[str, str],
    seeds: list[str],
    values: dict[str, list[float]],
    run_ids: list[str],
) -> ReportRow:
    """A row with every statistic of each metric: mean, std, n and the 95% interval.

    One function for configuration rows and stage rows, so both are computed the same way.
    """
    stats = {m: nan_stats(v) for m, v in values.items()}
    mean, std = ({m: st[i] for m, st in stats.items()} for i in (0, 1))
    row = ReportRow(row_id, label, params, seeds, values, mean, std, run_ids)
    for m, v in values.items():
        row.n[m], _, _, row.ci_lo[m], row.ci_hi[m] = mean_ci(v, CI_LEVEL)
    return row


@dataclass
class Report:
    """Everything ``build_report`` found and wrote; ``best`` maps a metric to a config_id."""

    experiment: str
    rows: list[ReportRow]
    best: dict[str, str]
    skipped_runs: int
    files: dict[str, Path]
    markdown: str
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    mode: str = "max"
    title: str = ""
    skipped_by_status: dict[str, int] = field(default_factory=dict)
    duplicate_runs: int = 0
    missing_per_class: int = 0
    baseline: str | None = None  # config_id of the baseline row
    stage_rows: list[ReportRow] = field(default_factory=list)  # upstream stages (``--stages``)
    stage_notes: list[str] = field(default_factory=list)  # footnotes about the stage rows
    figure_notes: dict[str, str] = field(default_factory=dict)  # figure name -> its caption

    @property
    def all_rows(self) -> list[ReportRow]:
        """Stage rows (upstream first) then configuration rows: the tables' order."""
        return [*self.stage_rows, *self.rows]
