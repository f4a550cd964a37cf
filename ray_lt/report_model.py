"""What a report is: one row per configuration with its statistics, and the report itself.

Shared by the reader (``reporting.py``, MLflow runs -> rows) and the writers
(``report_tables.py``, rows -> Markdown, LaTeX and CSV).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray_lt.stats import Comparison

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
