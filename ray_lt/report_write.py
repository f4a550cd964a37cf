"""Write a finished ``Report`` to its folder: tables, figures and the HTML page, all or nothing.

Every file is first rendered into a temporary folder and moved into the report folder only when
all of them were written, so a failure half-way (an unreadable figure input, a full disk in the
temporary folder) leaves an earlier report exactly as it was, as the CLI promises.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray_lt.report_figures import (
    SHOT_GROUPS,
    plot_learning_curves,
    plot_pareto,
    plot_per_class,
    plot_shot_groups,
)
from ray_lt.report_html import FIGURES, format_html
from ray_lt.report_model import Report
from ray_lt.report_tables import format_latex, format_markdown, write_csv


@dataclass
class FigureInputs:
    """What the figures need beyond the rows.

    Attributes:
        per_class: row id -> (train_count, accuracy) arrays, accuracy averaged over seeds.
        curves: row id -> {epoch: [value per seed]} of the final stage's ``curve_metric``.
        curve_metric: the metric the learning curves show (``val_overall`` or ``overall``).
        front: the two metrics of the Pareto figure, or None for no figure.
        front_modes: "max" / "min" per front metric.
    """

    per_class: dict[str, tuple] = field(default_factory=dict)
    curves: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    curve_metric: str = "val_overall"
    front: tuple[str, str] | None = None
    front_modes: tuple[str, str] = ("max", "max")


def write_report(report: Report, inputs: FigureInputs, out_dir: str | Path) -> Report:
    """Render every output of ``report`` and move them into ``out_dir`` (created if missing).

    Fills ``report.files`` (kind -> final path) and ``report.markdown``.
    """
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="ray_lt_report_") as tmp:
        staged = Path(tmp)
        for name, draw in _figures(report, inputs).items():
            report.files[name] = draw(staged / f"{name}.png")
        if "pareto" in report.files and inputs.front is not None:
            _note_off_front(report, inputs.front)
        if inputs.curves and inputs.curve_metric != "val_overall":
            report.figure_notes["learning_curves"] = (
                f"The final stage's {inputs.curve_metric} (test split: no run logged a "
                "validation split) by epoch: mean over seeds, band from the lowest to the "
                "highest seed."
            )
        report.markdown = format_markdown(report)
        for kind, text in (("md", report.markdown), ("tex", format_latex(report))):
            report.files[kind] = staged / f"table.{kind}"
            report.files[kind].write_text(text, encoding="utf-8")
        report.files["csv"] = write_csv(report, staged / "table.csv")
        html = format_html(report)
        report.files["html"] = staged / "index.html"
        report.files["html"].write_text(html, encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        for kind, path in report.files.items():
            report.files[kind] = Path(shutil.move(path, out / path.name))
    return report


def _note_off_front(report: Report, front: tuple[str, str]) -> None:
    """Name, in the Pareto figure's caption, the configurations it cannot place."""
    off = [r.label for r in report.rows if not all(r.n.get(m, 0) for m in front)]
    if off:
        report.figure_notes["pareto"] = (
            f"{FIGURES['pareto']} Not drawn, no {front[0]} or {front[1]} value: {'; '.join(off)}."
        )


def _figures(report: Report, inputs: FigureInputs) -> dict[str, Callable[[Path], Path]]:
    """Figure name -> how to draw it, for each figure the report has the numbers for."""
    draw: dict[str, Callable[[Path], Path]] = {}
    front = inputs.front
    rows = report.all_rows
    if front is not None and any(all(r.n.get(m, 0) for m in front) for r in report.rows):
        draw["pareto"] = lambda p: plot_pareto(report, front, inputs.front_modes, p)
    if any(r.n.get(g, 0) for r in rows for g in SHOT_GROUPS):
        draw["shot_groups"] = lambda p: plot_shot_groups(report, p)
    if inputs.per_class:
        draw["per_class"] = lambda p: plot_per_class(report, inputs.per_class, p)
    if inputs.curves:
        metric = inputs.curve_metric
        draw["learning_curves"] = lambda p: plot_learning_curves(report, inputs.curves, metric, p)
    return draw
