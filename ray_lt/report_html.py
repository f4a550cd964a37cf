"""The report as one self-contained HTML page: the table, its footnotes and every figure.

One file a reader can open from disk, mail, or log as an MLflow artifact (whose viewer shows an
HTML file but none of its neighbours): images are embedded as ``data:`` URIs (base64 PNG),
styles are inline and nothing is fetched. The table's cells are the Markdown table's
(``report_tables.table_cells``), so the page and ``table.md`` cannot disagree.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from ray_lt.report_model import Report
from ray_lt.report_tables import caption_lines, notes, row_label, table_cells

# figure name (a key of Report.files) -> what it shows, in the order the page shows them
FIGURES = {
    "pareto": "Pareto front: mean per configuration, bars the 95% interval of each mean; "
    "red points are not dominated on both metrics by any other configuration.",
    "shot_groups": "Many / medium / few-shot accuracy per row, whiskers the 95% interval.",
    "per_class": "Per-class accuracy against training images per class: classes binned on a "
    "log axis, line the bin mean, band ± the std over the bin's classes.",
    "learning_curves": "The final stage's validation accuracy by epoch: mean over seeds, band "
    "from the lowest to the highest seed.",
}
_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{padding:.3em .7em;"
    "border-bottom:1px solid #ccc;text-align:right}th:first-child,td:first-child"
    "{text-align:left}thead th{border-bottom:2px solid #444}tr.stage td{color:#555;"
    "font-style:italic}small{color:#666}figure{margin:2em 0}img{max-width:100%}"
    "figcaption{color:#444;font-size:.9em}"
)


def data_uri(png: Path) -> str:
    """``data:image/png;base64,...`` of a PNG file."""
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def format_html(report: Report) -> str:
    """The page: title, captions, the table, the footnotes, then each figure the report drew."""
    head = "".join(f"<th>{escape(h)}</th>" for h in ["configuration", "n", *report.metrics])
    body = []
    for row in report.all_rows:
        cells = table_cells(report, row, "<strong>{}</strong>", " <small>{}</small>", str)
        tds = "".join(f"<td>{c}</td>" for c in [escape(row_label(row)), len(row.seeds), *cells])
        body.append(f'<tr class="{"stage" if row.stage else "config"}">{tds}</tr>')
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(report.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(report.title)}</h1>",
        *(f"<p>{escape(line)}</p>" for line in caption_lines(report)),
        f"<table><thead><tr>{head}</tr></thead><tbody>",
        *body,
        "</tbody></table><ul>",
        *(f"<li>{escape(note)}</li>" for note in notes(report)),
        "</ul>",
    ]
    for name, caption in FIGURES.items():
        if name in report.files:
            text = report.figure_notes.get(name, caption)
            parts += [
                f'<figure><img alt="{escape(name)}" src="{data_uri(report.files[name])}">',
                f"<figcaption>{escape(text)}</figcaption></figure>",
            ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
