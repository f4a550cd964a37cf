"""``python -m ray_lt.report FILE``: the experiment's ablation tables and per-class plot.

Reads the experiment's finished trial runs from MLflow (the same tracking URI the sweep used)
and writes ``reports/<experiment>/table.{md,tex,csv}`` and ``per_class.png``; the Markdown table
is also printed. Test-split numbers, mean ± std over seeds, best per column in bold.
"""

from __future__ import annotations

import argparse
import sys

from ray_lt.errors import RayLtError
from ray_lt.experiment import load_experiment
from ray_lt.reporting import DEFAULT_METRICS, build_report
from ray_lt.tracking import default_tracking_uri, normalize_uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ray_lt.report", description=__doc__.splitlines()[0]
    )
    p.add_argument("file", help="the experiment file the sweep ran")
    p.add_argument("--smoke", action="store_true", help="report the smoke variant's runs")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite ./mlflow.db)")
    p.add_argument("--out", help="output folder (default: reports/<experiment name>)")
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated columns (default: the experiment's report_metrics, "
        f"usually {','.join(DEFAULT_METRICS)})",
    )
    args = p.parse_args(argv)
    try:
        exp = load_experiment(args.file, smoke=args.smoke)
        uri = normalize_uri(args.tracking_uri or exp.tracking_uri or default_tracking_uri())
        report = build_report(
            uri,
            exp.name,
            args.out or f"reports/{exp.name}",
            metrics=[m.strip() for m in args.metrics.split(",") if m.strip()]
            if args.metrics
            else list(exp.report_metrics),
            smoke=args.smoke,
        )
    except RayLtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    for kind, path in sorted(report.files.items()):
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
