"""MLflow mirror of trials and stages: every trial a run, every stage a nested run.

Stage results live in the artifact store first; MLflow gets a copy (params, per-epoch metrics
from the artifact's history, the artifact files) when a stage finishes or is reused. Writes are
batched (``log_batch``) because MLflow's SQLite store is slow with many small writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from ray_lt.errors import RayLtError

ROLE, TRIAL, STAGE, REPORT = "ray_lt.role", "trial", "stage", "report"
# MLflow 3's UI opens an experiment on its GenAI overview (traces, prompts) unless the
# experiment says it is a model-training one; then it opens on the runs table.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
MAX_RUN_NAME = 120  # characters of a run name the runs table can show
MAX_PARAM_LEN = 500
SQLITE = "sqlite:///"
LOCK_WAIT_S = 120.0  # MLflow creates and migrates a new database in seconds
_SQLITE_READY: set[str] = set()  # SQLite URIs this process has checked and set up
# MLflow's own refusal of a database whose alembic revision is not its head
_MLFLOW_OUTDATED = re.compile(
    r"out-of-date database schema \(found version (\S+), but expected (\S+)\)"
)


def default_tracking_uri(cwd: str | None = None) -> str:
    """A SQLite store in the working directory, as an absolute URI (Tune changes the CWD)."""
    return f"sqlite:///{os.path.abspath(os.path.join(cwd or os.getcwd(), 'mlflow.db'))}"


def normalize_uri(uri: str) -> str:
    """One absolute tracking URI for what users type.

    ``sqlite:///rel.db`` and ``x.db`` become absolute SQLite URIs (Tune changes the working
    directory of trials); a local folder, plain or ``file://``, holds ``mlflow.db`` (MLflow's file
    store is refused by default since 3.x, docs/ray_notes.md); ``http(s)://`` and other schemes are
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


@contextlib.contextmanager
def sqlite_setup(uri: str) -> Iterator[None]:
    """Run the first opening of a SQLite store in this process alone among all processes.

    MLflow creates the tables and runs every migration the first time it opens an empty
    database, with no lock between processes: sweeps (or trials) starting together on a new file
    break each other and can leave it half-migrated for good. Here the file is checked first (a
    half-migrated one is refused, never touched) and MLflow's set-up then runs under an exclusive
    lock on ``<db>.lock``. Later openings in this process skip both; other schemes pass through.
    """
    if not uri.startswith(SQLITE) or uri in _SQLITE_READY:
        yield
        return
    path = uri[len(SQLITE) :]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _exclusive_lock(f"{path}.lock", LOCK_WAIT_S):
        check_schema(uri)
        yield
    _SQLITE_READY.add(uri)


@contextlib.contextmanager
def _exclusive_lock(lock_path: str, wait_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``, waiting at most ``wait_s`` seconds.

    A blocking ``flock`` cannot time out without signals, which only the main thread may use;
    this polls instead. The kernel drops the lock when the holder exits, even when it crashes.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RayLtError(
            f"cannot create the lock file {lock_path} ({err.strerror}); the folder of the "
            "MLflow database must be writable"
        ) from None
    try:
        deadline = time.monotonic() + wait_s
        while not _try_flock(fd):
            if time.monotonic() > deadline:
                raise RayLtError(
                    f"waited {wait_s:.0f} s for the lock {lock_path}, held by another process "
                    "setting up this MLflow database; if none is running (fuser "
                    f"{lock_path}), run again"
                )
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def check_schema(uri: str) -> None:
    """Refuse, in one line, a SQLite file MLflow would fail on or try to migrate again.

    A first start that was interrupted (or raced) leaves alembic's temporary tables, no or an
    older ``alembic_version``, or tables without a version; MLflow then fails with a long
    traceback, or migrates again on top of the debris. Only reads the file (sqlite3, no create);
    a missing or empty file is a new database, which MLflow creates.
    """
    path = uri[len(SQLITE) :]
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    try:
        tables, revisions = _read_schema(path)
    except sqlite3.DatabaseError as err:
        raise RayLtError(
            f"{path} is not an SQLite database MLflow can open ({err}); move it aside or pass "
            "another --tracking-uri"
        ) from None
    debris = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if not debris and not revisions and "experiments" not in tables:
        return  # no MLflow table yet: MLflow creates them
    if debris or not revisions:
        found = f"leftover {', '.join(debris)}" if debris else "tables but no schema revision"
        raise _schema_error(uri, found)
    head = _head_revision()
    if revisions != [head]:
        raise _schema_error(uri, f"schema revision {', '.join(revisions)}, not {head}", older=True)


def _read_schema(path: str) -> tuple[set[str], list[str]]:
    """The table names of a SQLite file and the revisions in its ``alembic_version``."""
    conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        tables = {name for (name,) in rows}
        revisions: list[str] = []
        if "alembic_version" in tables:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            revisions = sorted(rev for (rev,) in rows)
        return tables, revisions
    finally:
        conn.close()


def _head_revision() -> str:
    """The schema revision this MLflow writes and expects (the head of its migrations)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _schema_error(uri: str, found: str, older: bool = False) -> RayLtError:
    """One line for a database MLflow cannot use as it is: what was found, and the way out."""
    path = uri[len(SQLITE) :]
    cause = "half-migrated (e.g. by an interrupted first start)"
    fix = f"move it aside (mv {shlex.quote(path)} {shlex.quote(path + '.broken')}) and run again"
    if older:
        cause += " or is older"
        fix += f", or if it is merely older, back it up and run: mlflow db upgrade {uri}"
    return RayLtError(f"the MLflow database {path} ({found}) was left {cause}; {fix}")


def _store_error(uri: str, err: Exception) -> RayLtError:
    """One line for a tracking store that failed to open or answer."""
    text = str(err)
    outdated = _MLFLOW_OUTDATED.search(text)
    if uri.startswith(SQLITE) and outdated:
        found = f"schema revision {outdated[1]}, not {outdated[2]}"
        return _schema_error(uri, found, older=True)
    first = text.splitlines()[0][:200] if text else ""
    return RayLtError(
        f"cannot reach the MLflow tracking store {uri} ({type(err).__name__}: {first}); "
        "start the server or pass --tracking-uri"
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

    def start_trial(self, trial_id: str, config: Mapping[str, Any], smoke: bool) -> str:
        tags = {
            ROLE: TRIAL,
            "ray_lt.trial_id": trial_id,
            "ray_lt.config_id": config_id(config),
            "ray_lt.label": config_label(config),
            "ray_lt.smoke": str(smoke).lower(),
            "mlflow.runName": run_name(config),
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
            "mlflow.runName": stage_run_name(spec, reused),
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
        return closed

    def trial_runs(self, status: str, started_after_ms: int | None = None) -> list:
        """This experiment's trial runs in ``status``, optionally only the recent ones."""
        where = f"tags.`{ROLE}` = '{TRIAL}' and attributes.status = '{status}'"
        if started_after_ms is not None:
            where += f" and attributes.start_time >= {int(started_after_ms)}"
        return self.client.search_runs([self.experiment_id], where, max_results=5000)

    def log_report(self, out_dir: str, smoke: bool) -> str:
        """A FINISHED run holding a report's files under ``report/``, so that the MLflow UI
        opens ``report/index.html``; its role keeps it out of every later report's rows."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        tags = {
            ROLE: REPORT,
            "ray_lt.smoke": str(smoke).lower(),
            "mlflow.runName": f"report {stamp}",
        }
        run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        self.client.log_artifacts(run_id, out_dir, artifact_path="report")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

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
