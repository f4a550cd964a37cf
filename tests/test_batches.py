"""Which stages a trial hands one worker group (``pipeline._lock_batch``), with real stage locks
in a real store and no Ray: everything it can lock now, dependencies first; a stage another
trial holds is left out with its dependants; other resources mean another group. And which of
the final stage's epoch reports reach Tune's scheduler."""

from __future__ import annotations

import os

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.engine.sessions import to_scheduler
from ray_lt.pipeline import ONE_GROUP_PER_STAGE_ENV, StageOutcome, TrialContext, _lock_batch
from ray_lt.recipes import cbd
from ray_lt.spec import Resources, walk
from tests.conftest import TINY


@pytest.fixture
def dag():
    """Two teachers (CE-style stages) feeding one student, as in CBD."""
    student = cbd("vanilla1+data_aug1", seed=0, data=TINY, backbone="resnet8")
    return walk(student)


def _batch(stages, store, done=None):
    ctx = TrialContext(store_uri=store.uri)
    batch, locks = _lock_batch(stages, done or {}, store, ctx)
    for lock in locks:
        lock.release()
    return [s.key for s in batch]


def test_a_free_dag_is_one_batch_in_dependency_order(dag, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    assert [s.name for s in dag][-1] == "student"  # the fixture: teachers, then the student
    assert _batch(dag, store) == [s.key for s in dag]
    assert not list((tmp_path / "store" / "_locks").glob("*.lock"))  # all released


def test_a_stage_another_trial_trains_is_left_out_with_its_dependants(dag, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    first, second, student = dag
    other = store.lock(first.key, f"{os.uname().nodename}:{os.getpid()}")  # a live holder
    assert other.acquire(timeout_s=0)
    try:
        assert _batch(dag, store) == [second.key]  # trains what it can before waiting
    finally:
        other.release()
    assert _batch(dag, store) == [first.key, second.key, student.key]


def test_stored_inputs_count_as_ready(dag, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    first, second, student = dag
    done = {first.key: StageOutcome(first, None, reused=True)}
    assert _batch(dag, store, done) == [second.key, student.key]


def test_other_resources_start_another_group(dag, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    first, second, student = dag
    wide = student.with_resources(Resources(num_workers=2))
    assert _batch([first, second, wide], store) == [first.key, second.key]


def test_one_group_per_stage_when_asked(dag, tmp_path, monkeypatch):
    monkeypatch.setenv(ONE_GROUP_PER_STAGE_ENV, "1")
    store = ArtifactStore(tmp_path / "store")
    assert _batch(dag, store) == [dag[0].key]


def test_the_last_epoch_never_reaches_the_scheduler():
    # ASHA may stop a trial at any report it sees: at the last epoch that would lose the stage
    assert [to_scheduler({"epoch": e}, 3) for e in (1, 2, 3)] == [True, True, False]
    assert not to_scheduler({"epoch": 1}, 1)  # a one-epoch stage: nothing to stop early
