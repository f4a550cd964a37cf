"""A trial's MLflow mirror that never costs the trial its results.

The artifact store is the record of what was trained; MLflow is a mirror of it. When the
tracking server cannot be reached (at the trial's start or mid-sweep), ``TrialMirror`` keeps
going offline: what it could not write is kept, in order, as a JSON record in the store
(``_records/mirror/<experiment>/<trial>.json``), and ``replay_outbox`` writes it to MLflow once
the server is back. The sweep driver replays at the end of every sweep and at the start of
``--resume``. A record names stage keys, never copies of files, so replaying reads the stored
artifacts themselves.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

from ray_lt.artifacts import Artifact, ArtifactStore
from ray_lt.errors import RayLtError
from ray_lt.tracking import Tracker

OUTBOX = "mirror"
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
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        store: ArtifactStore,
        trial_id: str,
        config: Mapping[str, Any],
        smoke: bool,
    ) -> None:
        self.store = store
        nonce = uuid.uuid4().hex[:8]  # a retried trial keeps its id; its record is its own
        self.record_name = f"{OUTBOX}/{_safe(experiment)}/{_safe(trial_id)}-{nonce}.json"
        self.record: dict[str, Any] = {
            "tracking_uri": tracking_uri,
            "experiment": experiment,
            "trial_id": trial_id,
            "config": dict(config),
            "smoke": smoke,
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
                self.record["run_id"] = self.tracker.start_trial(trial_id, config, smoke)
        except Exception as err:  # noqa: BLE001 - any tracking failure: go offline, keep training
            self._offline(err)

    @property
    def run_id(self) -> str | None:
        return self.record["run_id"]

    def log_stage(self, artifact: Artifact, *, reused: bool, final: bool) -> None:
        """Mirror one stage's artifact as a nested run (or keep it for later)."""
        self._do({"op": "stage", "key": artifact.key, "reused": reused, "final": final})

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
                    record["trial_id"], record["config"], bool(record.get("smoke"))
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


def _safe(name: str) -> str:
    """A record-name-safe form of an experiment or trial name."""
    out = "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)
    return out if out[:1].isalnum() else f"x{out}"
