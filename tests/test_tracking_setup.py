"""Setting up a SQLite tracking store: once, one process at a time; a broken file is refused.

Real parts: real MLflow creating and migrating a real SQLite file, several real processes
started together on one new database, databases broken the way an interrupted first start leaves
them (with sqlite3), the real sweep CLI on such a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_lt.errors import RayLtError
from ray_lt.tracking import EXPERIMENT_KIND, Tracker
from tests.cli import ROOT

# Each child imports everything first, says it is ready, then waits for the barrier file so that
# all of them open the new database at the same moment.
CHILD = """
import sys, time
from pathlib import Path
from ray_lt.tracking import Tracker
uri, name, ready, barrier = sys.argv[1:5]
Path(ready).touch()
while not Path(barrier).exists():
    time.sleep(0.005)
Tracker(uri, name)
"""
NAMES = ["shared", "shared", "shared", "alpha", "beta", "gamma"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_processes_starting_together_on_a_new_database_all_succeed(tmp_path):
    db = tmp_path / "new" / "mlflow.db"
    uri = f"sqlite:///{db}"
    barrier = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, uri, name, str(tmp_path / f"ready{i}"), str(barrier)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, name in enumerate(NAMES)
    ]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready*"))) < len(procs) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    barrier.touch()
    outcomes = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    failed = [err[-3000:] for rc, err in outcomes if rc != 0]
    assert not failed, f"{len(failed)}/{len(procs)} failed:\n" + "\n----\n".join(failed)
    tracker = Tracker(uri, "after")
    for name in {*NAMES, "after"}:
        assert tracker.client.get_experiment_by_name(name) is not None, name
    tracker.start_trial("t1", {"lr": 0.1}, smoke=True)


def test_lock_held_too_long_fails_in_one_line_naming_the_lock(tmp_path, monkeypatch):
    from ray_lt import tracking_store

    db = tmp_path / "mlflow.db"
    monkeypatch.setattr(tracking_store, "LOCK_WAIT_S", 0.5)
    with open(f"{db}.lock", "w") as held:  # another process setting the database up
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RayLtError) as info:
            Tracker(f"sqlite:///{db}", "exp")
    message = str(info.value)
    assert "\n" not in message and f"{db}.lock" in message, message
    assert not db.exists()  # nothing touched the database before the lock
    Tracker(f"sqlite:///{db}", "exp")  # free again: set up as usual


@pytest.fixture(scope="module")
def good_db(tmp_path_factory) -> Path:
    """A database MLflow created and migrated to its head revision."""
    db = tmp_path_factory.mktemp("good") / "mlflow.db"
    Tracker(f"sqlite:///{db}", "good")
    return db


def _older_revision(db: Path) -> str:
    """The revision before the one ``db`` is at (a real step of MLflow's migrations)."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    with sqlite3.connect(db) as conn:
        (head,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    script = ScriptDirectory.from_config(_get_alembic_config(db_url=""))
    return script.get_revision(head).down_revision


def _break(db: Path, how: str) -> None:
    """Leave ``db`` as a crash in the middle of MLflow's first migration can."""
    older = _older_revision(db) if how in ("older_revision", "both") else None
    conn = sqlite3.connect(db)
    with conn:
        if how in ("tmp_table", "both"):
            conn.execute("CREATE TABLE _alembic_tmp_tags (key VARCHAR(250), value TEXT)")
        if older:
            conn.execute("UPDATE alembic_version SET version_num = ?", (older,))
        if how == "no_version":
            conn.execute("DROP TABLE alembic_version")
        if how == "empty_version":
            conn.execute("DELETE FROM alembic_version")
    conn.close()


@pytest.fixture(params=["tmp_table", "older_revision", "no_version", "empty_version", "both"])
def broken_db(request, good_db, tmp_path) -> Path:
    db = tmp_path / "broken" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(good_db, db)
    _break(db, request.param)
    return db


def test_half_migrated_database_is_refused_in_one_line_and_left_as_it_is(broken_db):
    before = _sha256(broken_db)
    with pytest.raises(RayLtError) as info:
        Tracker(f"sqlite:///{broken_db}", "exp")
    message = str(info.value)
    assert "\n" not in message, message
    assert str(broken_db) in message and "half-migrated" in message, message
    assert f"mv {broken_db} {broken_db}.broken" in message, message
    assert _sha256(broken_db) == before
    assert sorted(p.name for p in broken_db.parent.iterdir()) == ["mlflow.db", "mlflow.db.lock"]


def test_older_schema_message_offers_mlflow_db_upgrade(good_db, tmp_path):
    db = tmp_path / "old.db"
    shutil.copyfile(good_db, db)
    _break(db, "older_revision")
    with pytest.raises(RayLtError, match=re.escape(f"mlflow db upgrade sqlite:///{db}") + "$"):
        Tracker(f"sqlite:///{db}", "exp")


def test_mlflow_out_of_date_schema_error_becomes_the_same_one_line_message(good_db, tmp_path):
    """MLflow's own check, should it ever see such a file first, reads the same to the user."""
    import sqlalchemy
    from mlflow.exceptions import MlflowException
    from mlflow.store.db.utils import _verify_schema

    from ray_lt.tracking_store import _store_error

    db = tmp_path / "old.db"
    shutil.copyfile(good_db, db)
    _break(db, "older_revision")
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    with pytest.raises(MlflowException) as info:
        _verify_schema(engine)
    engine.dispose()
    message = str(_store_error(f"sqlite:///{db}", info.value))
    assert "\n" not in message and "half-migrated" in message, message
    assert f"mv {db} {db}.broken" in message and f"mlflow db upgrade sqlite:///{db}" in message


def test_file_that_is_not_a_database_is_refused_in_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database, just some bytes " * 64)
    before = _sha256(db)
    with pytest.raises(RayLtError, match="not an SQLite database") as info:
        Tracker(f"sqlite:///{db}", "exp")
    assert "\n" not in str(info.value) and str(db) in str(info.value)
    assert _sha256(db) == before


def test_sweep_cli_on_a_half_migrated_database_exits_2_in_one_line(good_db, tmp_path):
    db = tmp_path / "mlflow.db"
    shutil.copyfile(good_db, db)
    _break(db, "both")
    before = _sha256(db)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_lt.sweep",
            str(ROOT / "tests" / "fixtures" / "shared_ce.py"),
            "--store",
            str(tmp_path / "store"),
            "--tracking-uri",
            f"sqlite:///{db}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert str(db) in lines[0] and "half-migrated" in lines[0] and "mv " in lines[0]
    assert _sha256(db) == before
    assert not (tmp_path / "store" / "_tune").exists()


def test_experiments_open_on_the_runs_table_in_the_mlflow_ui(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "fresh")
    client = MlflowClient(uri)
    client.create_experiment("older", artifact_location=str(tmp_path / "a"))  # made before
    assert client.get_experiment_by_name("older").tags.get(EXPERIMENT_KIND) is None
    Tracker(uri, "older")
    for name in ("fresh", "older"):
        tags = client.get_experiment_by_name(name).tags
        assert tags[EXPERIMENT_KIND] == "custom_model_development", (name, tags)


def test_runs_are_named_by_configuration_seed_and_stage_role(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "setup").client.create_experiment("named", artifact_location=str(tmp_path / "a"))
    tracker = Tracker(uri, "named")
    config = {"teachers": "vanilla1+data_aug1", "alpha": 0.4, "seed": 1, "__trial_index__": 0}
    trial = tracker.start_trial("abc123", config, smoke=False)
    teacher = {"spec": {"kind": "cbd_teacher", "name": "teacher_vanilla1"}}
    student = {"spec": {"kind": "cbd_student", "name": "student"}}
    done = {"test": {"overall": 0.5}}
    kw = {"final": False, "artifact_dir": None}
    first = tracker.log_stage(trial, teacher, done, key="cbd_teacher-1", reused=True, **kw)
    second = tracker.log_stage(trial, student, done, key="cbd_student-2", reused=False, **kw)
    names = [tracker.client.get_run(r).info.run_name for r in (trial, first, second)]
    assert names == [
        "alpha=0.4 teachers=vanilla1+data_aug1 · seed 1",
        "teacher vanilla1 (reused)",
        "student",
    ]


def test_a_stage_run_cut_off_by_a_kill_is_ended_with_its_trial(tmp_path):
    from ray_lt.tracking import PARENT, ROLE, STAGE

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "cut")
    killed, live = (tracker.start_trial(t, {"lr": 0.1, "seed": 0}, smoke=False) for t in "ab")
    # what a kill between log_stage's create_run and set_terminated leaves: a RUNNING stage run
    tags = {ROLE: STAGE, "ray_lt.stage_key": "ce-1", "ray_lt.reused": "false"}
    orphan, running = (
        tracker.client.create_run(tracker.experiment_id, tags={**tags, PARENT: parent})
        for parent in (killed, live)
    )
    assert tracker.close_unfinished(["a"]) == 1  # trial "b" is another sweep's, still running
    status = {r: tracker.client.get_run(r).info for r in (killed, orphan.info.run_id)}
    assert [i.status for i in status.values()] == ["KILLED", "KILLED"]
    assert all(i.end_time is not None for i in status.values())
    left = tracker.client.get_run(running.info.run_id).info
    assert (left.status, left.end_time) == ("RUNNING", None)


def _artifact(store, key: str, epoch_s: list[float]):
    """A stored stage artifact (spec, metrics with an epoch history), as a stage publishes it."""
    import json
    import tempfile

    history = [{"epoch": i + 1, "epoch_s": s, "overall": 0.4} for i, s in enumerate(epoch_s)]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"key": key, "spec": {"kind": "ce", "name": "ce", "train": {"epochs": 2}}}
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        metrics = {"test": {"overall": 0.5}, "val": {"overall": 0.45}, "history": history}
        Path(tmp, "metrics.json").write_text(json.dumps(metrics))
        return store.put(key, tmp)


def test_sweep_run_holds_its_trials_and_stages_across_resume_and_offline_replay(tmp_path):
    """One sweep run per sweep, continued by --resume; a trial mirrored offline and replayed
    later nests under it; a stage run spans its training (measured, else its epochs)."""
    from mlflow.tracking import MlflowClient

    from ray_lt.artifacts import ArtifactStore
    from ray_lt.experiment import Experiment
    from ray_lt.mirror import (
        TrialMirror,
        begin_sweep_run,
        end_sweep_run,
        replay_outbox,
        training_times,
    )
    from ray_lt.tracking_server import free_port

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    Tracker(uri, "setup").client.create_experiment("nest", artifact_location=str(tmp_path / "a"))
    store = ArtifactStore(tmp_path / "store")
    exp = Experiment(name="nest", pipeline=lambda c: None, seeds=(0, 1))
    sweep = begin_sweep_run(store, uri, exp, "experiments/nest.py", smoke=True, resume=False)
    end_sweep_run(uri, "nest", sweep, "KILLED")  # interrupted
    assert begin_sweep_run(store, uri, exp, "experiments/nest.py", True, resume=True) == sweep
    run = client.get_run(sweep)
    assert run.info.status == "RUNNING" and run.data.tags["ray_lt.resumed"] == "1"
    assert re.fullmatch(r"nest · \d{4}-\d\d-\d\d \d\d:\d\d UTC", run.info.run_name)
    assert run.data.tags["ray_lt.role"] == "sweep" and run.data.tags["ray_lt.smoke"] == "true"
    assert run.data.tags["ray_lt.experiment_file"] == "experiments/nest.py"
    assert run.data.params["seeds"] == "[0, 1]" and run.data.params["search"] == "optuna"

    art = _artifact(store, "ce-00000000000000aa", [2.0, 3.0])
    dead = f"http://127.0.0.1:{free_port()}"  # MLflow unreachable: the trial goes offline
    mirror = TrialMirror(dead, "nest", store, "t1", {"lr": 0.1, "seed": 0}, True, sweep)
    mirror.stage_seconds[art.key] = 7.5  # as the pipeline measured it
    mirror.log_stage(art, reused=False, final=True)
    reused_at = time.time()
    mirror.log_stage(art, reused=True, final=True)
    mirror.finish({"overall": 0.5}, art.key)
    time.sleep(0.05)
    assert replay_outbox(store, uri, "nest") == (1, 0)
    end_sweep_run(uri, "nest", sweep, "FINISHED")

    run = client.get_run(sweep)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["trials"] == 1 and run.data.metrics["trials_finished"] == 1
    (trial,) = client.search_runs([run.info.experiment_id], "tags.`ray_lt.role` = 'trial'")
    assert trial.data.tags["mlflow.parentRunId"] == sweep
    stages = client.search_runs([run.info.experiment_id], "tags.`ray_lt.role` = 'stage'")
    assert {s.data.tags["mlflow.parentRunId"] for s in stages} == {trial.info.run_id}
    trained, reused = sorted(stages, key=lambda s: s.data.tags["ray_lt.reused"])
    published = store.storefs.mtime(store.storefs.path(art.key, "manifest.json"))
    assert trained.info.end_time == pytest.approx(published * 1000, abs=1)
    assert trained.info.end_time - trained.info.start_time == pytest.approx(7500, abs=2)
    assert reused.info.start_time == pytest.approx(reused_at * 1000, abs=20)  # not the replay's
    assert reused.info.end_time - reused.info.start_time <= 1
    start, end = training_times(art, None)  # no measured length: the epochs' sum
    assert end - start == pytest.approx(5.0)

    store.write_record("sweep/nest.json", {"run_id": "0" * 32})  # a run this store lacks
    fresh = begin_sweep_run(store, uri, exp, "experiments/nest.py", True, resume=True)
    assert fresh != sweep and client.get_run(fresh).info.status == "RUNNING"
