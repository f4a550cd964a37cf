"""A report's tables: Markdown, LaTeX (booktabs) and CSV, the same cells in each.

Cells are percent with one decimal (mean ± std, the 95% interval of the mean, a significance
mark against the baseline row); the CSV keeps fractions at full precision. A NaN mean is a
dash, never 0.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

from ray_lt.report_model import CI_LEVEL, PER_CLASS_ARTIFACT, Report, ReportRow
from ray_lt.stats import MARKS_LEGEND, significance_mark

_DASH_MD, _DASH_TEX = "–", "--"
_CSV_STATS = (("", "_mean"), ("", "_std"), ("best_", ""))
# appended after the param columns, so every older column keeps its name and position
_CSV_TESTS = ("_n", "_ci_lo", "_ci_hi", "_p", "_test", "_delta")
_TESTS = {
    "paired": "paired t-test over matched seeds",
    "welch": "Welch's t-test",
    "none": "no test, n < 2",
}


def format_cell(mean: float, std: float, dash: str = _DASH_MD, pm: str = " ± ") -> str:
    """'38.3 ± 0.4' from fractions (percent, 1 decimal); ``dash`` when the mean is NaN."""
    if math.isnan(mean):
        return dash
    return f"{100 * mean:.1f}{pm}{100 * (0.0 if math.isnan(std) else std):.1f}"


def format_ci(lo: float, hi: float) -> str:
    """'[37.8, 38.8]' from fractions (percent, 1 decimal); '' when there is no interval."""
    if math.isnan(lo) or math.isnan(hi):
        return ""
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def row_label(row: ReportRow) -> str:
    """The row's label as the tables print it: '(baseline)' or '(stage)' appended."""
    if row.stage:
        return f"{row.label} (stage)"
    return f"{row.label} (baseline)" if row.baseline else row.label


def _cell_list(cells: list[tuple[ReportRow, str]], everything: int) -> str:
    """'lr=0.1: few, many; lr=0.2: few' (or '' when the list covers ``everything`` cells)."""
    if len(cells) == everything:
        return ""
    by_row: dict[str, list[str]] = {}
    for row, metric in cells:
        by_row.setdefault(row_label(row), []).append(metric)
    return "; ".join(f"{label}: {', '.join(ms)}" for label, ms in by_row.items())


def notes(report: Report) -> list[str]:
    """The seeds-per-row line and the footnotes (skipped, duplicate, artifact-less runs, cells
    over fewer values than seeds or without an interval, the tests against the baseline, the
    stage rows)."""
    rows = report.all_rows
    counts = sorted({len(r.seeds) for r in rows})
    per_row = "seeds per row: " + ", ".join(f"{r.label}: {len(r.seeds)}" for r in rows)
    notes = [f"{_n(counts[0], 'seed')} per row." if len(counts) == 1 else per_row + "."]
    cells = [(r, m) for r in rows for m in report.metrics if r.n[m] > 0]
    if fewer := [
        f"{r.label} {m}: {r.n[m]} of {len(r.seeds)}" for r, m in cells if r.n[m] < len(r.seeds)
    ]:
        notes.append(f"Fewer values than seeds (NaN runs ignored): {', '.join(fewer)}.")
    if ones := [(r, m) for r, m in cells if r.n[m] == 1]:
        which = _cell_list(ones, len(cells))
        notes.append(f"n = 1: no interval{f' ({which})' if which else ''}.")
    if report.baseline is not None:
        tests: dict[str, list[tuple[ReportRow, str]]] = {}
        for r in rows:
            for m, c in r.comparison.items():
                tests.setdefault(c.test, []).append((r, m))
        total = sum(len(v) for v in tests.values())
        used = [
            _TESTS[t] + (f" ({which})" if (which := _cell_list(tests[t], total)) else "")
            for t in _TESTS
            if t in tests
        ]
        if used:
            notes.append(f"Tests vs the baseline (two-sided): {'; '.join(used)}.")
    detail = ", ".join(f"{s}: {n}" for s, n in report.skipped_by_status.items()) or "none"
    notes.append(f"Skipped {_n(report.skipped_runs, 'unfinished trial run')} ({detail}).")
    if report.duplicate_runs:
        notes.append(f"Ignored {_n(report.duplicate_runs, 'older duplicate run')} of a seed.")
    if report.missing_per_class:
        notes.append(f"{_n(report.missing_per_class, 'run')} without {PER_CLASS_ARTIFACT}.")
    if report.stage_rows:
        notes.append(
            "Rows marked (stage): upstream stages of these configurations, one value per stage "
            "result and seed (a stage shared by trials counts once); never bold."
        )
    return notes + report.stage_notes


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def table_cells(
    report: Report,
    row: ReportRow,
    bold: str,
    ci: str,
    mark: Callable[[str], str],
    dash: str = _DASH_MD,
    pm: str = " ± ",
) -> list[str]:
    """The formatted metric cells of one row: 'mean ± std', its CI, its significance mark.

    ``bold`` wraps the best 'mean ± std' and ``ci`` the interval ('{}' = the text); ``mark``
    formats the mark ('**'). A cell without an interval (n < 2) or a test result gets neither.
    """
    cells = []
    for m in report.metrics:
        cell = format_cell(row.mean[m], row.std[m], dash, pm)
        if report.best.get(m) == row.config_id:
            cell = bold.format(cell)
        if interval := format_ci(row.ci_lo[m], row.ci_hi[m]):
            cell += ci.format(interval)
        if m in row.comparison and (sig := significance_mark(row.comparison[m].p)):
            cell += mark(sig)
        cells.append(cell)
    return cells


def _md_mark(sig: str) -> str:
    """'\\*\\*': escaped, since Markdown would read a bare '**' as bold."""
    return sig.replace("*", "\\*")


def _caption(report: Report) -> str:
    better = "higher" if report.mode == "max" else "lower"
    level = f"{100 * CI_LEVEL:g}%"
    return (
        f"Accuracy (%), mean ± std over seeds [{level} CI of the mean, Student t]; n = seeds; "
        f"bold = best mean ({better} is better)."
    )


def _marks_caption(report: Report) -> str:
    base = next(r.label for r in report.rows if r.config_id == report.baseline)
    return f"Marks: t-test of each row against the baseline ({base}): {MARKS_LEGEND}."


def caption_lines(report: Report) -> list[str]:
    """The caption and, with a baseline, the legend of the marks (plain text)."""
    lines = [_caption(report)]
    if report.baseline is not None:
        lines.append(_marks_caption(report))
    return lines


def format_markdown(report: Report) -> str:
    """The Markdown table: title, caption, one row per configuration, seeds line, footnotes."""
    # '*' escaped: Markdown would read '**' as bold
    caption = [line.replace("*", "\\*") for line in caption_lines(report)]
    head = "| configuration | n | " + " | ".join(report.metrics) + " |\n|---|---:|"
    lines = [f"# {report.title}", "", *caption, "", head + "---:|" * len(report.metrics)]
    for row in report.all_rows:
        cells = table_cells(report, row, "**{}**", " {}", _md_mark)
        label = row_label(row).replace("|", chr(92) + "|")
        lines.append(f"| {label} | {len(row.seeds)} | " + " | ".join(cells) + " |")
    lines += ["", *notes(report)]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX.update({ch: "\\" + ch for ch in "&%$#_{}"})


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (``_ % & $ # { } ~ ^ \\``) in plain text."""
    return "".join(_TEX.get(ch, ch) for ch in text)


def format_latex(report: Report) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), the same cells as Markdown."""
    footnotes = " ".join(latex_escape(n) for n in notes(report))
    metrics = " & ".join(latex_escape(m) for m in report.metrics)
    head = f"Configuration & $n$ & {metrics} \\\\"
    caption = latex_escape(_caption(report)).replace("±", "$\\pm$")
    lines = [f"% {latex_escape(report.title)}: {caption}"]
    if report.baseline is not None:
        lines.append(f"% {latex_escape(_marks_caption(report))}")
    tabular = "\\begin{tabular}{lr" + "c" * len(report.metrics) + "}"
    lines += [f"% {footnotes}", tabular, "\\toprule", head, "\\midrule"]
    for row in report.all_rows:
        ci, bold = " {{\\scriptsize {}}}", "\\textbf{{{}}}"
        cells = table_cells(report, row, bold, ci, _tex_mark, _DASH_TEX, " $\\pm$ ")
        label = f"{latex_escape(row_label(row))} & {len(row.seeds)}"
        lines.append(label + " & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _tex_mark(sig: str) -> str:
    return f"$^{{{sig}}}$"


def write_csv(report: Report, path: str | Path) -> Path:
    """Write the table as CSV: fractions (not percent) at full precision, NaN as an empty cell.

    Columns: label, config_id, n_seeds, per metric ``<m>_mean``, ``<m>_std``, ``best_<m>``
    (true/false), then ``param:<name>`` per parameter, then ``baseline`` (true for the baseline
    row) and per metric ``<m>_n`` (finite values), ``<m>_ci_lo``, ``<m>_ci_hi`` (95% interval of
    the mean), ``<m>_p``, ``<m>_test`` (welch/paired/none) and ``<m>_delta`` (mean minus the
    baseline's mean) of the test against the baseline row, empty for the baseline itself and
    when no baseline was named, then ``stage`` (the stage's kind on a stage row of
    ``--stages``, whose params are not in the ``param:`` columns; empty on a configuration).
    New columns go at the end, so older ones keep their position.

    Args:
        report: the report to write.
        path: destination file.
    """
    path = Path(path)
    param_keys = sorted({k for r in report.rows for k in r.params})
    header = ["label", "config_id", "n_seeds"]
    header += [f"{p}{m}{s}" for m in report.metrics for p, s in _CSV_STATS]
    header += [f"param:{k}" for k in param_keys]
    header += ["baseline"] + [f"{m}{s}" for m in report.metrics for s in _CSV_TESTS]
    header.append("stage")
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in report.all_rows:
            line = [r.label, r.config_id, str(len(r.seeds))]
            for m in report.metrics:
                best = "true" if report.best.get(m) == r.config_id else "false"
                line += [_num(r.mean[m]), _num(r.std[m]), best]
            line += [("" if r.stage else r.params.get(k, "")) for k in param_keys]
            line.append("true" if r.baseline else "false")
            for m in report.metrics:
                c = r.comparison.get(m)
                line += [str(r.n[m]), _num(r.ci_lo[m]), _num(r.ci_hi[m])]
                line += ["", "", ""] if c is None else [_num(c.p), c.test, _num(c.delta)]
            writer.writerow([*line, r.stage])
    return path


def _num(x: float) -> str:
    return "" if math.isnan(x) else repr(float(x))
