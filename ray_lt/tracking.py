"""MLflow mirror of sweeps, trials and stages: sweep run > trial runs > stage runs.

Each sweep invocation is a run (a ``--resume`` continues it), its trials are runs nested under
it, and each trial's stages are runs nested under the trial. Stage results live in the artifact
store first; MLflow gets a copy (params, per-epoch metrics from the artifact's history, the
artifact files, the training's start and end) when a stage finishes or is reused. Writes are
batched (``log_batch``) because MLflow's SQLite store is slow with many small writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from ray_lt.errors import RayLtError
from ray_lt.tracking_store import _store_error, check_reachable, normalize_uri, sqlite_setup

ROLE, SWEEP, TRIAL, STAGE = "ray_lt.role", "sweep", "trial", "stage"
PARENT = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment on its GenAI overview (traces, prompts) unless the
# experiment says it is a model-training one; then it opens on the runs table.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
MAX_RUN_NAME = 120  # characters of a run name the runs table can show
MAX_PARAM_LEN = 500


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping to ``a/b`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:MAX_PARAM_LEN]
    return out


def config_id(config: Mapping[str, Any]) -> str:
    """Equal for trials that differ only by seed: rows of an ablation table."""
    rest = {k: v for k, v in config.items() if k != "seed" and not k.startswith("__")}
    blob = json.dumps(rest, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def config_label(config: Mapping[str, Any]) -> str:
    rest = flatten({k: v for k, v in config.items() if k != "seed" and not k.startswith("__")})
    return " ".join(f"{k}={_short(v)}" for k, v in sorted(rest.items())) or "default"


def run_name(config: Mapping[str, Any]) -> str:
    """A trial run's name in the MLflow UI: its configuration and seed, e.g.
    ``lr=0.1 teachers=vanilla1+data_aug1 · seed 1`` (the table tells trials apart by it)."""
    name = f"{config_label(config)} · seed {config.get('seed')}"
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 3] + "..."


def stage_run_name(spec: Mapping[str, Any], reused: bool) -> str:
    """A stage run's name: its role in the pipeline (``teacher vanilla1``, ``student``)."""
    role = str(spec.get("name") or spec.get("kind")).replace("_", " ")
    return f"{role} (reused)" if reused else role


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class Tracker:
    """Writes one experiment's runs; the URI is always explicit (never the CWD default)."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = normalize_uri(tracking_uri)
        self.experiment_name = experiment_name
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        try:
            with sqlite_setup(self.uri):  # MLflow creates and migrates a new database here
                self.client = MlflowClient(tracking_uri=self.uri)
                exp = self.client.get_experiment_by_name(experiment_name)
                self.experiment_id = (
                    exp.experiment_id if exp else _create(self.client, experiment_name)
                )
                if exp is None or exp.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
                    self.client.set_experiment_tag(
                        self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING
                    )
        except RayLtError:
            raise
        except Exception as err:  # noqa: BLE001 - any client failure means the same to the user
            raise _store_error(self.uri, err) from None

    def start_sweep(self, file: str, smoke: bool, params: Mapping[str, Any]) -> str:
        """The run of one sweep invocation, RUNNING; its trials nest under it.

        Named by the experiment and the start time (``cbd_ens · 2026-11-30 19:20 UTC``): the
        runs table lists one row per sweep, and the report picks the newest by default.
        """
        now = time.time()
        tags = {
            ROLE: SWEEP,
            "ray_lt.experiment_file": file,
            "ray_lt.smoke": str(smoke).lower(),
            "mlflow.runName": f"{self.experiment_name} · "
            + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now)),
        }
        run = self.client.create_run(self.experiment_id, start_time=int(now * 1000), tags=tags)
        self._log(run.info.run_id, params=flatten(params))
        return run.info.run_id

    def resume_sweep(self, run_id: str) -> bool:
        """RUNNING again, for ``--resume``; False when ``run_id`` is no sweep run of this
        experiment in this store (e.g. the sweep first ran against another tracking URI)."""
        run = self.sweep_run(run_id)
        if run is None:
            return False
        resumed = int(run.data.tags.get("ray_lt.resumed", "0")) + 1
        self.client.set_tag(run_id, "ray_lt.resumed", str(resumed))
        self.client.update_run(run_id, status="RUNNING")
        return True

    def finish_sweep(self, run_id: str, status: str = "FINISHED") -> dict[str, int]:
        """Count the sweep's trial runs by status (metrics ``trials``, ``trials_finished``...),
        then end the sweep run with ``status``; returns the counts."""
        where = f"tags.`{ROLE}` = '{TRIAL}' and tags.`{PARENT}` = '{run_id}'"
        trials = self.client.search_runs([self.experiment_id], where, max_results=5000)
        counts = {"trials": len(trials)}
        for state in ("FINISHED", "FAILED", "KILLED", "RUNNING"):
            counts[f"trials_{state.lower()}"] = sum(r.info.status == state for r in trials)
        self._log(run_id, final=counts)
        self.client.set_terminated(run_id, status)
        return counts

    def sweep_run(self, run_id: str) -> Any:
        """The run ``run_id`` if it is a sweep run of this experiment, else None."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MLflow raises for an unknown or malformed id
            return None
        mine = run.info.experiment_id == self.experiment_id
        return run if mine and run.data.tags.get(ROLE) == SWEEP else None

    def start_trial(
        self,
        trial_id: str,
        config: Mapping[str, Any],
        smoke: bool,
        parent_run_id: str | None = None,
    ) -> str:
        """A trial run, nested under its sweep's run when there is one."""
        tags = {
            ROLE: TRIAL,
            "ray_lt.trial_id": trial_id,
            "ray_lt.config_id": config_id(config),
            "ray_lt.label": config_label(config),
            "ray_lt.smoke": str(smoke).lower(),
            "mlflow.runName": run_name(config),
        }
        if parent_run_id:
            tags[PARENT] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=tags)
        params = flatten({k: v for k, v in config.items() if not k.startswith("__")})
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    def finished_trial_run(self, trial_id: str) -> str | None:
        """The run id of a FINISHED run of Tune trial ``trial_id``, if there is one."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`ray_lt.trial_id` = '{trial_id}' and attributes.status = "
            "'FINISHED'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def log_stage(
        self,
        parent_run_id: str,
        spec_doc: Mapping[str, Any],
        metrics: Mapping[str, Any],
        *,
        key: str,
        reused: bool,
        final: bool,
        artifact_dir: str | None,
        times: tuple[float, float] | None = None,
    ) -> str:
        """A stage run nested under its trial's run.

        ``times`` is the stage's training (start, end) in seconds since the epoch, so that the
        runs table's Duration is the training's (a reused stage: the moment of its reuse, twice);
        None: the time of logging.
        """
        spec = spec_doc.get("spec", {})
        tags = {
            ROLE: STAGE,
            PARENT: parent_run_id,
            "mlflow.runName": stage_run_name(spec, reused),
            "ray_lt.stage_kind": str(spec.get("kind")),
            "ray_lt.stage_name": str(spec.get("name")),
            "ray_lt.stage_key": key,
            "ray_lt.reused": str(reused).lower(),
            "ray_lt.final": str(final).lower(),
        }
        start_ms, end_ms = (
            (math.floor(times[0] * 1000), math.ceil(times[1] * 1000)) if times else (None, None)
        )
        run = self.client.create_run(self.experiment_id, start_time=start_ms, tags=tags)
        rid = run.info.run_id
        params = flatten({k: spec.get(k, {}) for k in ("data", "train", "params")})
        history = [] if reused else metrics.get("history", [])
        steps = [(int(h.get("epoch", i + 1)), _finite(h)) for i, h in enumerate(history)]
        final_metrics = _finite(metrics.get("test", {}))
        final_metrics.update({f"val_{k}": v for k, v in _finite(metrics.get("val", {})).items()})
        self._log(rid, params=params, steps=steps, final=final_metrics)
        if artifact_dir and not reused:
            self.client.log_artifacts(rid, artifact_dir, artifact_path="artifact")
        self.client.set_terminated(rid, "FINISHED", end_time=end_ms)
        return rid

    def finish_trial(
        self, run_id: str, metrics: Mapping[str, float], per_class_parquet: str | None
    ) -> None:
        self._log(run_id, final=_finite(metrics))
        if per_class_parquet:
            self.client.log_artifact(run_id, per_class_parquet)
        self.client.set_terminated(run_id, "FINISHED")

    def close_unfinished(
        self,
        trial_ids: list[str] | None = None,
        status: str = "KILLED",
        *,
        started_after_ms: int | None = None,
    ) -> int:
        """Mark trial runs still RUNNING (stopped by ASHA, or killed) as ``status``: those of
        ``trial_ids`` (every one when None) started at or after ``started_after_ms``."""
        runs = self.trial_runs("RUNNING", started_after_ms)
        closed = 0
        for run in runs:
            if trial_ids is None or run.data.tags.get("ray_lt.trial_id") in trial_ids:
                self.client.set_terminated(run.info.run_id, status)
                closed += 1
        self._close_orphan_stages(status)
        return closed

    def _close_orphan_stages(self, status: str) -> None:
        """``log_stage`` creates, fills and ends a stage run in one go; a kill halfway through
        (Ctrl-C while a stage is being logged) leaves it RUNNING with no end. Such a run whose
        trial run has ended is ended too (another sweep's live trials keep theirs)."""
        where = f"tags.`{ROLE}` = '{STAGE}' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self.experiment_id], where, max_results=5000):
            parent = run.data.tags.get(PARENT)
            if not parent or self.client.get_run(parent).info.status != "RUNNING":
                self.client.set_terminated(run.info.run_id, status)

    def trial_runs(self, status: str, started_after_ms: int | None = None) -> list:
        """This experiment's trial runs in ``status``, optionally only the recent ones."""
        where = f"tags.`{ROLE}` = '{TRIAL}' and attributes.status = '{status}'"
        if started_after_ms is not None:
            where += f" and attributes.start_time >= {int(started_after_ms)}"
        return self.client.search_runs([self.experiment_id], where, max_results=5000)

    def log_report(self, out_dir: str, sweep_run_id: str) -> None:
        """A report's files under ``report/`` of the sweep run it reports, so that the MLflow
        UI shows ``report/index.html`` on that sweep's row; a later report of the same sweep
        overwrites them."""
        self.client.log_artifacts(sweep_run_id, out_dir, artifact_path="report")

    def fail_trial(self, run_id: str, message: str) -> None:
        self.client.set_tag(run_id, "ray_lt.error", message[:MAX_PARAM_LEN])
        self.client.set_terminated(run_id, "FAILED")

    def _log(
        self,
        run_id: str,
        params: Mapping[str, str] | None = None,
        steps: list[tuple[int, dict[str, float]]] | None = None,
        final: Mapping[str, float] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        metric_rows = [
            Metric(k, v, now, step) for step, row in steps or [] for k, v in row.items()
        ]
        metric_rows += [Metric(k, v, now, 0) for k, v in (final or {}).items()]
        param_rows = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, len(param_rows), 100):  # MLflow's per-batch limits: 100 params,
            self.client.log_batch(run_id, params=param_rows[i : i + 100])
        for i in range(0, len(metric_rows), 1000):  # 1000 metrics
            self.client.log_batch(run_id, metrics=metric_rows[i : i + 1000])


def _create(client: Any, name: str) -> str:
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - a concurrent trial created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
