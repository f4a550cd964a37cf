"""MLflow mirror of trials and stages: every trial a run, every stage a nested run.

Stage results live in the artifact store first; MLflow gets a copy (params, per-epoch metrics
from the artifact's history, the artifact files) when a stage finishes or is reused. Writes are
batched (``log_batch``) because MLflow's SQLite store is slow with many small writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from ray_lt.errors import RayLtError

ROLE, TRIAL, STAGE = "ray_lt.role", "trial", "stage"
MAX_PARAM_LEN = 500


def default_tracking_uri(cwd: str | None = None) -> str:
    """A SQLite store in the working directory, as an absolute URI (Tune changes the CWD)."""
    return f"sqlite:///{os.path.abspath(os.path.join(cwd or os.getcwd(), 'mlflow.db'))}"


def normalize_uri(uri: str) -> str:
    """One absolute tracking URI for what users type.

    ``sqlite:///rel.db`` and ``x.db`` become absolute SQLite URIs (Tune changes the working
    directory of trials); a local folder, plain or ``file://``, holds ``mlflow.db`` (MLflow's file
    store is refused by default since 3.x, RAY_NOTES.md); ``http(s)://`` and other schemes are
    kept as they are.
    """
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return f"sqlite:///{os.path.abspath(path)}" if not path.startswith("/") else uri
    if uri.startswith("file:"):
        uri = urllib.parse.unquote(urllib.parse.urlparse(uri).path)
    if "://" in uri:
        return uri
    path = os.path.abspath(os.path.expanduser(uri))
    return f"sqlite:///{path if path.endswith('.db') else os.path.join(path, 'mlflow.db')}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in one line, fast, when an ``http(s)://`` tracking server does not answer.

    MLflow's own client would retry for minutes before failing; this asks the server's
    ``/health`` endpoint once.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        reason = " ".join(str(getattr(err, "reason", err)).split())[:120]
    raise RayLtError(
        f"cannot reach the MLflow tracking server {uri} ({reason}); start it (python -m "
        "ray_lt.tracking_server --port N) or pass --tracking-uri sqlite:///mlflow.db"
    )


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
        check_reachable(self.uri)
        if self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.uri[len("sqlite:///") :]), exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            exp = self.client.get_experiment_by_name(experiment_name)
            self.experiment_id = (
                exp.experiment_id if exp else _create(self.client, experiment_name)
            )
        except RayLtError:
            raise
        except Exception as err:  # noqa: BLE001 - any client failure means the same to the user
            raise RayLtError(
                f"cannot reach the MLflow tracking store {self.uri} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); start the server or pass --tracking-uri"
            ) from None

    def start_trial(self, trial_id: str, config: Mapping[str, Any], smoke: bool) -> str:
        tags = {
            ROLE: TRIAL,
            "ray_lt.trial_id": trial_id,
            "ray_lt.config_id": config_id(config),
            "ray_lt.label": config_label(config),
            "ray_lt.smoke": str(smoke).lower(),
            "mlflow.runName": f"trial-{trial_id}",
        }
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
    ) -> str:
        spec = spec_doc.get("spec", {})
        tags = {
            ROLE: STAGE,
            "mlflow.parentRunId": parent_run_id,
            "mlflow.runName": f"{spec.get('name', spec.get('kind'))}-{key[-8:]}",
            "ray_lt.stage_kind": str(spec.get("kind")),
            "ray_lt.stage_name": str(spec.get("name")),
            "ray_lt.stage_key": key,
            "ray_lt.reused": str(reused).lower(),
            "ray_lt.final": str(final).lower(),
        }
        run = self.client.create_run(self.experiment_id, tags=tags)
        rid = run.info.run_id
        params = flatten({k: spec.get(k, {}) for k in ("data", "train", "params")})
        history = [] if reused else metrics.get("history", [])
        steps = [(int(h.get("epoch", i + 1)), _finite(h)) for i, h in enumerate(history)]
        final_metrics = _finite(metrics.get("test", {}))
        final_metrics.update({f"val_{k}": v for k, v in _finite(metrics.get("val", {})).items()})
        self._log(rid, params=params, steps=steps, final=final_metrics)
        if artifact_dir and not reused:
            self.client.log_artifacts(rid, artifact_dir, artifact_path="artifact")
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def finish_trial(
        self, run_id: str, metrics: Mapping[str, float], per_class_parquet: str | None
    ) -> None:
        self._log(run_id, final=_finite(metrics))
        if per_class_parquet:
            self.client.log_artifact(run_id, per_class_parquet)
        self.client.set_terminated(run_id, "FINISHED")

    def close_unfinished(self, trial_ids: list[str], status: str = "KILLED") -> int:
        """Mark trial runs still RUNNING (stopped by ASHA, or killed) as ``status``."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{ROLE}` = '{TRIAL}' and attributes.status = 'RUNNING'",
            max_results=5000,
        )
        closed = 0
        for run in runs:
            if run.data.tags.get("ray_lt.trial_id") in trial_ids:
                self.client.set_terminated(run.info.run_id, status)
                closed += 1
        return closed

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
