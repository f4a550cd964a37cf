"""Which MLflow runs a report reads: one sweep run's trial runs, or every trial run.

Each sweep invocation is a run (``ray_lt.role=sweep``) with its trial runs nested under it. A
report reads the newest sweep run of the experiment by default, the one named by ``--sweep``, or
every trial run (``--all-sweeps``, or an experiment whose runs predate sweep runs). Read only:
nothing here creates a run, an experiment or a sqlite file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_lt.errors import ConfigError, RayLtError

FIX = "run `python -m ray_lt.sweep FILE` first (or pass --tracking-uri)"


@dataclass(frozen=True)
class SweepChoice:
    """The runs a report reads: one sweep run's trials, or (``run_id`` None) every trial run."""

    run_id: str | None
    name: str  # the sweep run's name, or what "every trial run" stands for


def choose_sweep(
    tracking_uri: str,
    experiment_name: str,
    *,
    smoke: bool | None = None,
    sweep: str | None = None,
    all_sweeps: bool = False,
) -> SweepChoice:
    """The sweep a report reads; ``ConfigError`` for a ``sweep`` that is not one of the
    experiment's.

    Args:
        tracking_uri: MLflow tracking URI of the sweep.
        experiment_name: MLflow experiment name.
        smoke: the default picks the newest sweep run with this ``ray_lt.smoke`` tag (None: any).
        sweep: the run id of one sweep run of the experiment (``--sweep``).
        all_sweeps: every trial run of the experiment, whatever sweep ran it (``--all-sweeps``).
    """
    if sweep is not None and all_sweeps:
        raise ConfigError("--sweep and --all-sweeps exclude each other; pass one of them")
    client = client_for(tracking_uri)
    exp_id = _experiment_id(client, tracking_uri, experiment_name)
    sweeps = _search(client, tracking_uri, exp_id, "tags.`ray_lt.role` = 'sweep'")
    sweeps.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    if all_sweeps:
        return SweepChoice(None, "every sweep")
    if sweep is not None:
        found = [r for r in sweeps if r.info.run_id == sweep.strip()]
        if not found:
            known = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in sweeps[:5])
            raise ConfigError(
                f"--sweep {sweep} is not a sweep run of '{experiment_name}' in {tracking_uri} "
                f"(its sweeps, newest first: {known or 'none'}); pass one of them, or leave "
                "--sweep out to report the newest"
            )
        return SweepChoice(found[0].info.run_id, found[0].info.run_name)
    if smoke is not None:
        want = "true" if smoke else "false"
        sweeps = [r for r in sweeps if r.data.tags.get("ray_lt.smoke", "false") == want]
    if not sweeps:  # runs from before sweep runs: every trial run, as reports always read them
        return SweepChoice(None, "every trial run (no sweep run)")
    return SweepChoice(sweeps[0].info.run_id, sweeps[0].info.run_name)


def client_for(tracking_uri: str):
    """An MlflowClient bound to ``tracking_uri``; refuses a sqlite file that does not exist."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
        if db and db != ":memory:" and not Path(db).is_file():
            raise RayLtError(f"MLflow tracking database {db} does not exist; {FIX}")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client, tracking_uri: str, name: str) -> str:
    """The id of active experiment ``name``; a missing one is an error naming the known ones."""
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            where = f"{tracking_uri} (known: {known})"
            raise RayLtError(f"experiment '{name}' not found in {where}; {FIX}")
    except MlflowException as exc:
        raise _store_error(tracking_uri, exc) from exc
    return exp.experiment_id


def _search(client, tracking_uri: str, exp_id: str, query: str) -> list:
    """Every run of the experiment matching ``query``, all pages."""
    from mlflow.exceptions import MlflowException

    runs, token = [], None
    try:
        while token != "":
            page = client.search_runs([exp_id], query, page_token=token)
            runs.extend(page)
            token = page.token or ""
    except MlflowException as exc:
        raise _store_error(tracking_uri, exc) from exc
    return runs


def _store_error(tracking_uri: str, exc: Exception) -> RayLtError:
    fix = "pass a valid --tracking-uri such as sqlite:////abs/path/mlflow.db"
    return RayLtError(f"cannot read MLflow store {tracking_uri}: {first_line(exc)}; {fix}")


def trial_runs(
    client, tracking_uri: str, name: str, smoke: bool | None, sweep_run_id: str | None
) -> list:
    """The active trial runs (any status) of experiment ``name``: those nested under
    ``sweep_run_id``, or every one when it is None; filtered by the smoke tag."""
    query = "tags.`ray_lt.role` = 'trial'"
    if sweep_run_id is not None:
        query += f" and tags.`mlflow.parentRunId` = '{sweep_run_id}'"
    runs = _search(client, tracking_uri, _experiment_id(client, tracking_uri, name), query)
    if smoke is not None:
        want = "true" if smoke else "false"
        runs = [r for r in runs if r.data.tags.get("ray_lt.smoke", "false").lower() == want]
    return runs


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
