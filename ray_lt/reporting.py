"""Turn a sweep's MLflow trial runs into the ablation tables and figures a paper would print.

Reads the trial runs of one sweep run (``report_runs.py``: the newest by default), groups the
``ray_lt.role=trial`` runs by ``ray_lt.config_id`` and writes mean ± std over seeds,
the 95% confidence interval of the mean and, when a baseline row is named, a significance mark
from a t-test against it (``ray_lt.stats``) as Markdown, LaTeX (booktabs), CSV and one HTML
page, plus figures (``report_figures.py``: Pareto front, shot groups, per-class accuracy from
each run's ``per_class.parquet``, learning curves), so no number is copied by hand and a missing
one shows as a dash, never 0. With ``stages=True`` the upstream stages of the configurations get
rows of their own (``report_stages.py``). It only reads the store (never creates runs,
experiments or a sqlite file), and checks everything it can (metrics, the baseline, the front,
the stage tags) before it writes a file, so an error leaves an earlier report untouched.
``ray_lt/report.py`` is its CLI.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_lt.errors import ConfigError, CorruptArtifactError, RayLtError
from ray_lt.report_model import (
    DEFAULT_METRICS,
    PER_CLASS_ARTIFACT,
    PER_CLASS_COLUMNS,
    Report,
    ReportRow,
    make_row,
)
from ray_lt.report_model import nan_stats as _nan_stats
from ray_lt.report_model import natural_key as _natural_key
from ray_lt.report_runs import FIX as _FIX
from ray_lt.report_runs import choose_sweep, client_for, trial_runs
from ray_lt.report_stages import learning_curves, search_stage_runs, stage_rows
from ray_lt.report_write import FigureInputs, write_report
from ray_lt.stats import compare
from ray_lt.tracking import flatten


def build_report(
    tracking_uri: str,
    experiment_name: str,
    out_dir: str | Path,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    mode: str = "max",
    smoke: bool | None = None,
    title: str | None = None,
    baseline: Mapping[str, Any] | None = None,
    stages: bool = False,
    front: Sequence[str] | None = None,
    front_modes: Sequence[str] = ("max", "max"),
    sweep: str | None = None,
    all_sweeps: bool = False,
) -> Report:
    """Read the finished trial runs of an experiment and write its tables, figures and page.

    Writes ``table.{md,tex,csv}``, ``index.html`` and the figures it has numbers for
    (``pareto.png``, ``shot_groups.png``, ``per_class.png``, ``learning_curves.png``).

    Args:
        tracking_uri: MLflow tracking URI of the sweep, e.g. ``sqlite:////abs/path/mlflow.db``.
        experiment_name: MLflow experiment name (the experiment's ``name``).
        out_dir: folder for the outputs; created if missing, existing files are overwritten.
        metrics: metric names, one table column each, logged as fractions in [0, 1].
        mode: ``"max"`` or ``"min"``: which mean is best (bold) in each column.
        smoke: only smoke runs (True), only full runs (False), or both (None).
        title: title line of the Markdown table; defaults to the experiment name.
        baseline: params of the row every other row is tested against, e.g. ``{"method": "ce"}``
            (nested mappings as in the config; values compared as the strings MLflow stored; a
            key may also be the last part of a param name, ``lr`` for ``optim/lr``, when that is
            unambiguous). It must match exactly one row, else ``ConfigError`` before any file
            is written. None: no tests, no marks.
        stages: add a row per upstream stage of the configurations (``report_stages.py``);
            ``RayLtError`` when the runs predate the stage tags.
        front: the two metrics of the Pareto figure; both must have been logged, else
            ``ConfigError``. None: ``overall`` vs ``few``, drawn when both were logged.
        front_modes: "max" / "min" per front metric.
        sweep: the run id of the sweep run whose trials to read (None: ``choose_sweep``'s
            default, the newest sweep run, else every trial run).
        all_sweeps: read every trial run of the experiment, whatever sweep ran it.
    """
    metrics = list(metrics)
    front_pair, modes = _check_args(metrics, mode, front, front_modes)
    client, finished, skipped = _finished_runs(
        tracking_uri, experiment_name, smoke, sweep, all_sweeps
    )
    logged = sorted({k for r in finished for k in r.data.metrics})
    _check_logged(metrics, logged, experiment_name)
    front_pair = _front(front_pair, front is not None, logged, experiment_name)
    extra = [m for m in (*DEFAULT_METRICS, *(front_pair or ())) if m not in metrics]
    rows, duplicates = _rows(finished, metrics + list(dict.fromkeys(extra)))
    base = None if baseline is None else _baseline_row(rows, baseline, experiment_name)
    report = Report(experiment_name, rows, _best(rows, metrics, mode), 0, {}, "", metrics, mode)
    stage_runs = search_stage_runs(client, finished[0].info.experiment_id)
    if stages:
        report.stage_rows, report.stage_notes = stage_rows(
            client, stage_runs, rows, list(rows[0].values), experiment_name
        )
    if base is not None:
        _compare(report.all_rows, base, metrics)
    report.title, report.duplicate_runs = title or experiment_name, duplicates
    report.baseline = None if base is None else base.config_id
    report.skipped_runs = sum(skipped.values())
    report.skipped_by_status = dict(sorted(skipped.items()))
    inputs = FigureInputs(front=front_pair, front_modes=modes)
    inputs.per_class, report.missing_per_class = _load_per_class(client, rows)
    inputs.curve_metric, inputs.curves = learning_curves(client, stage_runs, rows)
    return write_report(report, inputs, out_dir)


def _finished_runs(
    tracking_uri: str,
    experiment_name: str,
    smoke: bool | None,
    sweep: str | None,
    all_sweeps: bool,
) -> tuple[Any, list, Counter]:
    """The chosen sweep's FINISHED trial runs (at least one, else ``RayLtError``), the MLflow
    client that read them, and how many runs of each other status were left out."""
    chosen = choose_sweep(
        tracking_uri, experiment_name, smoke=smoke, sweep=sweep, all_sweeps=all_sweeps
    )
    client = client_for(tracking_uri)
    runs = trial_runs(client, tracking_uri, experiment_name, smoke, chosen.run_id)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    skipped = Counter(r.info.status for r in runs if r.info.status != "FINISHED")
    if not finished:
        which = "" if smoke is None else f" (ray_lt.smoke={str(smoke).lower()})"
        what = f"experiment '{experiment_name}'{which} in {tracking_uri}"
        if chosen.run_id is not None:
            raise RayLtError(
                f"no finished trial runs in sweep {chosen.name} ({chosen.run_id}) of {what}; "
                "pass --sweep RUN_ID for another sweep, or --all-sweeps"
            )
        raise RayLtError(f"no finished trial runs of {what}; {_FIX}")
    return client, finished, skipped


def _check_args(
    metrics: list[str], mode: str, front: Sequence[str] | None, front_modes: Sequence[str]
) -> tuple[tuple[str, str], tuple[str, str]]:
    """The checks that need no store: mode, metrics, the front's shape; the front and modes."""
    if mode not in ("max", "min"):
        raise ConfigError(f"report mode must be 'max' or 'min', got {mode!r}; pass one of them")
    if not metrics:
        raise ConfigError("no metrics to tabulate; pass e.g. metrics=('few', 'overall')")
    pair = tuple(front) if front is not None else ("overall", "few")
    modes = tuple(front_modes)
    if len(pair) != 2 or len(set(pair)) != 2:
        raise ConfigError(
            f"a Pareto front needs two different metrics, got {', '.join(pair) or 'none'}; "
            "pass e.g. --front overall,few"
        )
    if len(modes) != 2 or any(m not in ("max", "min") for m in modes):
        raise ConfigError(
            f"front modes must be two of 'max'/'min', got {modes!r}; pass e.g. max,max"
        )
    return pair, modes  # type: ignore[return-value]


def _check_logged(metrics: list[str], logged: list[str], experiment: str) -> None:
    """Every table column was logged by some run, or is a standard group (a dash column)."""
    # a standard group may be absent everywhere (no few-shot classes): a column of dashes, also
    # for a second head's group ("soft_many") when that head was logged ("soft_overall")
    if unknown := [m for m in metrics if m not in logged and not _group_of_logged(m, logged)]:
        raise ConfigError(
            f"metric {unknown[0]!r} was not logged by any finished trial run of "
            f"'{experiment}'; logged: {', '.join(logged) or 'none'}"
        )


def _front(
    pair: tuple[str, str], asked: bool, logged: list[str], experiment: str
) -> tuple[str, str] | None:
    """The front to draw: an asked-for front must have both metrics logged (else an error);
    the default one (overall vs few) is drawn only when both were."""
    missing = [m for m in pair if m not in logged]
    if not missing:
        return pair
    if not asked:
        return None
    raise ConfigError(
        f"the Pareto front {pair[0]} vs {pair[1]} of '{experiment}' has no values for "
        f"{' and '.join(repr(m) for m in missing)} (no finished trial run logged it; logged: "
        f"{', '.join(logged) or 'none'}); pass --front with two logged metrics, e.g. "
        "--front overall,few"
    )


def _group_of_logged(metric: str, logged: list[str]) -> bool:
    """A shot group: ``few``, or ``<head>_few`` of a head logged as ``<head>_overall``."""
    if metric in DEFAULT_METRICS:
        return True
    head, _, group = metric.rpartition("_")
    return bool(head) and group in DEFAULT_METRICS and f"{head}_overall" in logged


def _rows(finished: list, metrics: list[str]) -> tuple[list[ReportRow], int]:
    """Group runs by config_id (newest run wins per seed) and compute per-metric statistics."""
    by_config: dict[str, dict[str, object]] = {}
    duplicates = 0
    for run in sorted(finished, key=lambda r: r.info.start_time or 0):
        cid = run.data.tags.get("ray_lt.config_id", run.info.run_id)
        seed = run.data.params.get("seed", run.data.tags.get("ray_lt.trial_id", run.info.run_id))
        seeds = by_config.setdefault(cid, {})
        duplicates += seed in seeds
        seeds[seed] = run
    groups: dict[str, dict[str, str]] = {}
    tag_labels: dict[str, str] = {}
    for cid, seeds in by_config.items():  # params equal over the config's runs, minus seed
        first, *rest = seeds.values()
        p = {k: v for k, v in first.data.params.items() if k != "seed"}
        groups[cid] = {k: v for k, v in p.items() if all(r.data.params.get(k) == v for r in rest)}
        tag_labels[cid] = first.data.tags.get("ray_lt.label", "")
    labels = _labels(groups, tag_labels)
    rows = []
    for cid, seeds in by_config.items():
        order = sorted(seeds, key=_natural_key)
        runs = [seeds[s] for s in order]
        values = {m: [float(r.data.metrics.get(m, math.nan)) for r in runs] for m in metrics}
        run_ids = [r.info.run_id for r in runs]
        rows.append(make_row(cid, labels[cid], groups[cid], order, values, run_ids))
    rows.sort(key=lambda r: (_natural_key(r.label), r.config_id))
    return rows, duplicates


def _baseline_row(
    rows: list[ReportRow], baseline: Mapping[str, Any], experiment: str
) -> ReportRow:
    """The one row whose params match every key/value of ``baseline``; else a ConfigError.

    Values are flattened and stringified exactly as the sweep logs params (``tracking.flatten``),
    so ``{"optim": {"lr": 0.05}}``, ``{"optim/lr": 0.05}`` and ``{"optim/lr": "0.05"}`` all match
    the param ``optim/lr=0.05``. A key that is no param name is looked up as the last part of one
    (``lr`` for ``optim/lr``, the name the labels show) when exactly one param ends so.
    """
    if not isinstance(baseline, Mapping) or not baseline:
        raise ConfigError(
            f"baseline must be a non-empty mapping of params to values, got {baseline!r}; "
            "pass e.g. baseline={'method': 'ce'} or --baseline method=ce"
        )
    want = flatten(baseline)
    shown = ",".join(f"{k}={v}" for k, v in want.items())
    keys = sorted({k for r in rows for k in r.params})
    resolved = {}
    for key, value in want.items():
        ends = [k for k in keys if k.endswith(f"/{key}")]
        resolved[key if key in keys or len(ends) != 1 else ends[0]] = value
    matches = [r for r in rows if all(r.params.get(k) == v for k, v in resolved.items())]
    if len(matches) == 1:
        return matches[0]
    labels = "; ".join(r.label for r in rows)
    if not matches:
        raise ConfigError(
            f"baseline {shown} matches no row of '{experiment}'; rows: {labels} "
            f"(params: {', '.join(keys) or 'none'}); pass key=value params of one row"
        )
    raise ConfigError(
        f"baseline {shown} matches {len(matches)} rows of '{experiment}' "
        f"({'; '.join(r.label for r in matches)}); add a key=value that tells them apart"
    )


def _compare(rows: list[ReportRow], base: ReportRow, metrics: list[str]) -> None:
    """Mark the baseline row and test every other row (stage rows too) against it, metric by
    metric."""
    for row in rows:
        row.baseline = row is base
        if row is not base:
            row.comparison = {
                m: compare(row.values[m], base.values[m], row.seeds, base.seeds) for m in metrics
            }


def _short_value(value: str) -> str:
    """Floats with 4 significant digits (Optuna samples print 17); everything else as is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "e" not in value else f"{number:.4g}"


def _labels(groups: dict[str, dict[str, str]], tag_labels: dict[str, str]) -> dict[str, str]:
    """'name=value ...' from the params that differ across configs, else the label tag."""
    keys = sorted({k for p in groups.values() for k in p})
    varying = [k for k in keys if len({p.get(k) for p in groups.values()}) > 1]
    short = {k: k.rsplit("/", 1)[-1] for k in varying}
    if len(set(short.values())) < len(varying):
        short = {k: k for k in varying}
    labels = {}
    for cid, p in groups.items():
        text = " ".join(f"{short[k]}={_short_value(p[k])}" for k in varying if k in p)
        labels[cid] = text or tag_labels[cid] or cid[:12]
    counts = Counter(labels.values())
    return {cid: f"{t} [{cid[:8]}]" if counts[t] > 1 else t for cid, t in labels.items()}


def _best(rows: list[ReportRow], metrics: list[str], mode: str) -> dict[str, str]:
    """Metric -> config_id of the best non-NaN mean (first row in table order on a tie)."""
    pick, best = (max if mode == "max" else min), {}
    for m in metrics:
        if cands := [r for r in rows if not math.isnan(r.mean[m])]:
            best[m] = pick(cands, key=lambda r, m=m: r.mean[m]).config_id
    return best


def _load_per_class(client, rows: list[ReportRow]) -> tuple[dict[str, tuple], int]:
    """config_id -> (train_count, accuracy averaged over seeds) per class, and #runs without one.

    Artifacts are downloaded with MLflow's artifact API and read with pyarrow (no pickles).
    """
    import pyarrow.parquet as pq

    curves, missing = {}, 0
    with tempfile.TemporaryDirectory(prefix="ray_lt_report_") as tmp:
        for row in rows:
            acc: dict[int, list[float]] = {}
            count: dict[int, int] = {}
            for run_id in row.run_ids:
                if PER_CLASS_ARTIFACT not in {f.path for f in client.list_artifacts(run_id)}:
                    missing += 1
                    continue
                local = client.download_artifacts(run_id, PER_CLASS_ARTIFACT, f"{tmp}/{run_id}")
                try:
                    table = pq.read_table(local, columns=list(PER_CLASS_COLUMNS)).to_pydict()
                except Exception as exc:
                    raise CorruptArtifactError(
                        f"{PER_CLASS_ARTIFACT} of run {run_id} is unreadable ({_first_line(exc)})"
                        f"; it needs columns {', '.join(PER_CLASS_COLUMNS)}; re-run or delete it"
                    ) from exc
                cols = (table["class"], table["train_count"], table["accuracy"])
                for c, n, a in zip(*cols, strict=True):
                    acc.setdefault(int(c), []).append(math.nan if a is None else float(a))
                    count[int(c)] = int(n)
            if acc:
                classes = sorted(acc)
                counts = np.array([count[c] for c in classes], dtype=np.float64)
                means = np.array([_nan_stats(acc[c])[0] for c in classes])
                curves[row.config_id] = (counts, means)
    return curves, missing


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
