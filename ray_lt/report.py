"""``python -m ray_lt.report FILE``: the experiment's ablation tables, figures and HTML page.

Reads the finished trial runs of the experiment's newest sweep from MLflow (the same tracking
URI the sweep used; ``--sweep RUN_ID`` for an older sweep, ``--all-sweeps`` for every trial run)
and writes ``reports/<experiment>/table.{md,tex,csv}``, the figures and ``index.html`` (one
self-contained page); the Markdown table is also printed. Test-split numbers, mean ± std over
seeds with the 95% confidence interval, best per column in bold, and a significance mark against
the baseline row (the experiment's ``baseline``, or ``--baseline key=value[,key=value]``).
``--stages`` adds a row per upstream stage; ``--front`` picks the Pareto figure's two metrics
(default: a two-objective experiment's objectives, else overall vs few). The files are also
logged as artifacts (``report/``) of the sweep run reported. docs/report.md says what every
column and figure means.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ray_lt.errors import ConfigError, RayLtError
from ray_lt.experiment import load_experiment
from ray_lt.report_runs import SweepChoice, choose_sweep
from ray_lt.reporting import DEFAULT_METRICS, build_report
from ray_lt.tracking_store import default_tracking_uri, normalize_uri


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
    p.add_argument(
        "--baseline",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="params of the row every other row is tested against, e.g. method=ce or "
        "optim/lr=0.05 (default: the experiment's baseline, if any)",
    )
    p.add_argument(
        "--stages",
        action="store_true",
        help="add a row per upstream stage of the configurations (e.g. ce before crt)",
    )
    p.add_argument(
        "--front",
        default=None,
        metavar="X,Y",
        help="the Pareto figure's two metrics, e.g. overall,few (default: the experiment's two "
        "objectives with 'val_' dropped, else overall,few when both were logged)",
    )
    p.add_argument(
        "--sweep",
        metavar="RUN_ID",
        help="the MLflow run id of the sweep to report (default: the experiment's newest sweep; "
        "every trial run when the experiment has no sweep run)",
    )
    p.add_argument(
        "--all-sweeps",
        action="store_true",
        help="report every trial run of the experiment, whatever sweep ran it",
    )
    args = p.parse_args(argv)
    # MLflow draws a progress bar for every artifact the report downloads (per-class tables)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        exp = load_experiment(args.file, smoke=args.smoke)
        baseline = parse_baseline(args.baseline) if args.baseline is not None else exp.baseline
        front, modes = front_of(args.front, exp.metrics, exp.modes)
        uri = normalize_uri(args.tracking_uri or exp.tracking_uri or default_tracking_uri())
        chosen = choose_sweep(
            uri, exp.name, smoke=args.smoke, sweep=args.sweep, all_sweeps=args.all_sweeps
        )
        report = build_report(
            uri,
            exp.name,
            args.out or f"reports/{exp.name}",
            metrics=[m.strip() for m in args.metrics.split(",") if m.strip()]
            if args.metrics
            else list(exp.report_metrics),
            smoke=args.smoke,
            baseline=baseline,
            stages=args.stages,
            front=front,
            front_modes=modes,
            sweep=chosen.run_id,
            all_sweeps=chosen.run_id is None,
        )
    except RayLtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    for kind, path in sorted(report.files.items()):
        print(f"wrote {kind}: {path}")
    log_to_mlflow(uri, exp.name, args.out or f"reports/{exp.name}", chosen)
    return 0


def log_to_mlflow(uri: str, experiment: str, out_dir: str, chosen: SweepChoice) -> None:
    """Copy the report into MLflow as artifacts of the sweep run it reports (the UI then shows
    ``report/index.html`` on that run); the files on disk are the report, so a failure here is
    a warning, never an error. A report of every trial run belongs to no one sweep: no copy."""
    from ray_lt.tracking import Tracker

    if chosen.run_id is None:
        print(f"MLflow: the report reads {chosen.name}; it is not copied to a sweep run")
        return
    try:
        Tracker(uri, experiment).log_report(out_dir, chosen.run_id)
    except Exception as err:  # noqa: BLE001 - MLflow holds a copy; the report is written
        print(f"warning: the report was not copied to MLflow: {err}", file=sys.stderr)
        return
    print(
        f"MLflow: sweep run '{chosen.name}' ({chosen.run_id}) of '{experiment}' holds the "
        "report (report/index.html)"
    )


def front_of(
    text: str | None, objectives: tuple[str, ...], modes: tuple[str, ...]
) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """The Pareto figure's metrics and modes: ``--front``, else a two-objective experiment's.

    The search optimises validation metrics (``val_overall``) while the report shows the test
    split, so an objective's ``val_`` prefix is dropped: the figure is the test-split front of
    what was searched. A one-objective experiment has no front of its own: None, and the
    report draws overall vs few when both were logged. ``--front`` with other than two names
    is an error (a front of one metric is just its column).
    """
    if text is not None:
        names = tuple(m.strip() for m in text.split(",") if m.strip())
        if len(names) != 2:
            raise ConfigError(
                f"--front {text!r} names {len(names)} metrics; a Pareto front needs two, "
                "e.g. --front overall,few"
            )
        by_name = dict(zip((_test_name(o) for o in objectives), modes, strict=True))
        return names, tuple(by_name.get(m, "max") for m in names)
    if len(objectives) == 2:
        return tuple(_test_name(o) for o in objectives), modes
    return None, ("max", "max")


def _test_name(metric: str) -> str:
    return metric.removeprefix("val_")


def parse_baseline(text: str) -> dict[str, str]:
    """``"method=ce,optim/lr=0.05"`` -> ``{"method": "ce", "optim/lr": "0.05"}``.

    A comma splits only where a ``key=`` follows, so a value may hold commas (``[1, 2]``).
    """
    parts = re.split(r",(?=[^,=]+=)", text.strip())
    pairs = [part.partition("=") for part in parts]
    if not text.strip() or any(not key.strip() or not eq for key, eq, _ in pairs):
        raise ConfigError(
            f"--baseline {text!r} is not KEY=VALUE[,KEY=VALUE]; pass e.g. --baseline method=ce"
        )
    return {key.strip(): value.strip() for key, _, value in pairs}


if __name__ == "__main__":
    sys.exit(main())
