"""A trial's MLflow mirror that never costs the trial its results.

The artifact store is the record of what was trained; MLflow is a mirror of it. When the
tracking server cannot be reached (at the trial's start or mid-sweep), ``TrialMirror`` keeps
going offline: what it could not write is kept, in order, as a JSON record in the store
(``_records/mirror/<experiment>/<trial>.json``), and ``replay_outbox`` writes it to MLflow once
the server is back. The sweep driver replays at the end of every sweep and at the start of
``--resume``. A record names stage keys, never copies of files, so replaying reads the stored
artifacts themselves; it also names the sweep run the trial nests under.

The sweep run itself (``begin_sweep_run``) is created by the driver, which needs MLflow at its
start anyway. Its id is kept in the store (``_records/sweep/<experiment>.json``, beside Tune's
``_tune/<experiment>`` that ``--resume`` restores), so that a resumed sweep continues the same run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

from ray_lt.artifacts import MANIFEST, Artifact, ArtifactStore
from ray_lt.errors import RayLtError
from ray_lt.tracking import Tracker

OUTBOX = "mirror"
SWEEPS = "sweep"  # _records/sweep/<experiment>.json: the sweep run a --resume continues
log = logging.getLogger(__name__)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


class TrialMirror:
    """MLflow runs of one trial: the trial run and one nested run per stage.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment: the experiment name.
        store: the artifact store (holds the outbox when MLflow is unreachable).
        trial_id: Tune's trial id.
        config: the trial's config (MLflow params).
        smoke: whether this is a smoke run (a tag).
        parent_run_id: the sweep's run, which the trial run nests under (None: no parent).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        store: ArtifactStore,
        trial_id: str,
        config: Mapping[str, Any],
        smoke: bool,
        parent_run_id: str | None = None,
    ) -> None:
        self.store = store
        # stage key -> seconds its training took, as the pipeline measured it (TrialContext)
        self.stage_seconds: dict[str, float] = {}
        nonce = uuid.uuid4().hex[:8]  # a retried trial keeps its id; its record is its own
        self.record_name = f"{OUTBOX}/{_safe(experiment)}/{_safe(trial_id)}-{nonce}.json"
        self.record: dict[str, Any] = {
            "tracking_uri": tracking_uri,
            "experiment": experiment,
            "trial_id": trial_id,
            "config": dict(config),
            "smoke": smoke,
            "parent_run_id": parent_run_id,
            "run_id": None,
            "ops": [],
        }
        self.tracker: Tracker | None = None
        self.finished_before = False
        try:
            self.tracker = Tracker(tracking_uri, experiment)
            # A driver killed after a trial finished, but before Tune's own snapshot recorded
            # it, restores the trial as unfinished; its MLflow run says otherwise.
            self.record["run_id"] = self.tracker.finished_trial_run(trial_id)
            self.finished_before = self.run_id is not None
            if not self.finished_before:
                self.record["run_id"] = self.tracker.start_trial(
                    trial_id, config, smoke, parent_run_id
                )
        except Exception as err:  # noqa: BLE001 - any tracking failure: go offline, keep training
            self._offline(err)

    @property
    def run_id(self) -> str | None:
        return self.record["run_id"]

    def log_stage(self, artifact: Artifact, *, reused: bool, final: bool) -> None:
        """Mirror one stage's artifact as a nested run (or keep it for later), with the
        (start, end) of its training; a reused stage's run is the moment of its reuse."""
        now = time.time()  # a replay, later, still shows when the reuse happened
        seconds = self.stage_seconds.get(artifact.key)
        times = [now, now] if reused else training_times(artifact, seconds)
        self._do(
            {"op": "stage", "key": artifact.key, "reused": reused, "final": final, "times": times}
        )

    def finish(self, metrics: Mapping[str, float], final_key: str) -> None:
        """Final metrics and the per-class table on the trial run; the run is FINISHED."""
        self._do({"op": "finish", "metrics": dict(metrics), "key": final_key})

    def fail(self, err: BaseException) -> None:
        """The trial run is FAILED with the error as a tag."""
        self._do({"op": "fail", "error": f"{type(err).__name__}: {err}"})

    def _do(self, op: dict[str, Any]) -> None:
        if self.tracker is not None:
            try:
                apply_op(self.tracker, self.store, self.run_id, op)
                return
            except Exception as err:  # noqa: BLE001 - the server went away mid-trial
                self._offline(err)
        self.record["ops"].append(op)
        self._save()

    def _offline(self, err: BaseException) -> None:
        self.tracker = None
        log.warning(
            "MLflow at %s is unreachable (%s); results stay in the store and are mirrored when "
            "it is back (at the end of the sweep, at the latest on --resume)",
            self.record["tracking_uri"],
            _one_line(err),
        )
        self._save()

    def _save(self) -> None:
        self.store.write_record(self.record_name, self.record)


def apply_op(tracker: Tracker, store: ArtifactStore, run_id: str | None, op: dict) -> None:
    """Write one outbox operation to MLflow, reading the artifact it names from the store."""
    if run_id is None:
        raise RayLtError("the trial run was never created")
    if op["op"] == "stage":
        art = store.open(op["key"])
        tracker.log_stage(
            run_id,
            art.spec(),
            art.metrics(),
            key=art.key,
            reused=op["reused"],
            final=op["final"],
            artifact_dir=None if op["reused"] else art.local_dir(),
            times=op.get("times") or (None if op["reused"] else training_times(art, None)),
        )
    elif op["op"] == "finish":
        per_class = os.path.join(store.open(op["key"]).local_dir(), "tables", "per_class.parquet")
        found = per_class if os.path.exists(per_class) else None
        tracker.finish_trial(run_id, op["metrics"], found)
    elif op["op"] == "fail":
        tracker.fail_trial(run_id, op["error"])
    else:
        raise RayLtError(f"unknown outbox operation {op['op']!r}")


def replay_outbox(store: ArtifactStore, tracking_uri: str, experiment: str) -> tuple[int, int]:
    """Mirror every kept trial record of ``experiment`` to MLflow; returns (done, left).

    Each record is rewritten after every operation it mirrors, so an interrupted replay never
    logs a stage twice. A record that still fails stays for the next replay.
    """
    records = store.records(f"{OUTBOX}/{_safe(experiment)}")
    if not records:
        return 0, 0
    tracker = Tracker(tracking_uri, experiment)  # raises in one line when still unreachable
    done = left = 0
    for name, record in records.items():
        try:
            if record.get("run_id") is None:
                record["run_id"] = tracker.start_trial(
                    record["trial_id"],
                    record["config"],
                    bool(record.get("smoke")),
                    record.get("parent_run_id"),
                )
                store.write_record(name, record)
            while record["ops"]:
                apply_op(tracker, store, record["run_id"], record["ops"][0])
                record["ops"].pop(0)
                store.write_record(name, record)
            store.remove_record(name)
            done += 1
        except Exception as err:  # noqa: BLE001 - keep it for the next replay
            log.warning("could not mirror %s yet: %s", name, _one_line(err))
            left += 1
    return done, left


def training_times(artifact: Artifact, seconds: float | None) -> list[float]:
    """The (start, end) of a stage's training, in seconds since the epoch.

    The end is when the store published the artifact (its manifest, written last); the start
    is that minus ``seconds``, the training's length as the pipeline measured it (data, epochs,
    evaluation, export), else the sum of the epochs' ``epoch_s`` in the artifact's history
    (an outbox record from before, or a stage trained before a worker group restarted): that
    leaves out evaluation and export, so it is a lower bound.
    """
    storefs = artifact.store.storefs
    end = storefs.mtime(storefs.path(artifact.key, MANIFEST)) or time.time()
    if seconds is None:
        history = artifact.metrics().get("history", [])
        seconds = sum(float(h.get("epoch_s", 0.0)) for h in history if isinstance(h, dict))
    return [end - max(0.0, seconds), end]


def begin_sweep_run(
    store: ArtifactStore,
    tracking_uri: str,
    experiment: Any,
    file: str,
    smoke: bool,
    resume: bool,
) -> str | None:
    """The run of this sweep invocation: with ``resume``, the run the interrupted sweep kept in
    the store (RUNNING again); else, or when that run is not in this tracking store, a new one.
    None, with a warning, when MLflow fails here: the trials then run with no parent run.

    Args:
        store: the artifact store (keeps the run's id for ``--resume``).
        tracking_uri: the MLflow tracking URI.
        experiment: the ``Experiment`` (its name, and a few settings as the run's params).
        file: the experiment file, as typed.
        smoke: whether this is the smoke variant.
        resume: whether this is ``--resume``.
    """
    try:
        return _begin(
            store, Tracker(tracking_uri, experiment.name), experiment, file, smoke, resume
        )
    except Exception as err:  # noqa: BLE001 - MLflow is a mirror; the sweep goes on
        print(f"warning: no MLflow sweep run: {_one_line(err)}", file=sys.stderr)
        return None


def _begin(
    store: ArtifactStore, tracker: Tracker, experiment: Any, file: str, smoke: bool, resume: bool
) -> str:
    name = f"{SWEEPS}/{_safe(experiment.name)}.json"
    if resume:
        kept = store.records(SWEEPS).get(name, {}).get("run_id")
        if kept and tracker.resume_sweep(kept):
            return kept
        why = f"run {kept} is not in {tracker.uri}" if kept else "no sweep run was kept"
        print(f"ray-lt: resuming with a new MLflow sweep run ({why})", file=sys.stderr)
    params = {
        "file": file,
        "smoke": smoke,
        "search": experiment.search,
        "num_samples": experiment.num_samples,
        "seeds": list(experiment.seeds),
        "metric": experiment.metric,
        "mode": experiment.mode,
    }
    run_id = tracker.start_sweep(file, smoke, params)
    store.write_record(name, {"run_id": run_id, "tracking_uri": tracker.uri})
    return run_id


def end_sweep_run(tracking_uri: str, experiment: str, run_id: str | None, status: str) -> None:
    """End the sweep run with ``status`` and its trial counts; a failure is a warning (MLflow
    is a mirror: the store and Tune's state hold the sweep)."""
    if run_id is None:
        return
    try:
        Tracker(tracking_uri, experiment).finish_sweep(run_id, status)
    except Exception as err:  # noqa: BLE001 - never cost the sweep its exit code
        print(
            f"warning: the MLflow sweep run {run_id} was not ended: {_one_line(err)}",
            file=sys.stderr,
        )


def _safe(name: str) -> str:
    """A record-name-safe form of an experiment or trial name."""
    out = "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)
    return out if out[:1].isalnum() else f"x{out}"
