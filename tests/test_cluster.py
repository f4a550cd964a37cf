"""Sweeps on a real local multi-node Ray cluster, tracked by a real MLflow server, through faults.

One cluster (``ray start --head`` with no CPUs plus two 2-CPU worker nodes, tests/local_cluster.py)
and one ``mlflow server`` (SQLite backend, 127.0.0.1) serve the whole module; every sweep is the
CLI a user types, with ``--address``, a ``file://`` store URI and an ``http://`` tracking URI.
Faults are real: a stage worker SIGKILLs itself, the driver is SIGKILLed, the MLflow server is
stopped, a worker node's whole process tree is SIGKILLed. Counts come from the store and MLflow.
The node test runs last: it leaves one worker node.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.tracking_server import TrackingServer
from tests.local_cluster import ENV, LocalCluster

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "cluster_sweep.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("cluster-logs")
    local = LocalCluster(logdir)
    try:
        yield local.start()
    finally:
        local.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    with TrackingServer(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")) as srv:
        yield srv


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return f"file://{tmp_path_factory.mktemp('shared-store')}"


def _env(sweep: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CLUSTER_SWEEP": sweep,
        "RAY_AUTH_MODE": ENV["RAY_AUTH_MODE"],
        "RAY_LT_LOCK_HEARTBEAT_S": "2",
        "RAY_LT_LOCK_STALE_S": "12",
        **extra,
    }


def _command(cluster, store_uri, tracking_uri, *extra):
    return [
        sys.executable,
        "-m",
        "ray_lt.sweep",
        str(FIXTURE),
        "--address",
        cluster.address,
        "--store",
        store_uri,
        "--tracking-uri",
        tracking_uri,
        *extra,
    ]


def _sweep(cluster, store_uri, tracking_uri, sweep, *extra, env=None, timeout=900):
    proc = subprocess.run(
        _command(cluster, store_uri, tracking_uri, *extra),
        cwd=ROOT,
        env=_env(sweep, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    (cluster.logdir / f"sweep-{sweep}-{time.time():.0f}.log").write_text(proc.stdout + proc.stderr)
    return proc


def _runs(uri: str, experiment: str, filter_string: str = ""):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=5000)


def _trials(uri: str, experiment: str, status: str):
    return _runs(
        uri, experiment, f"tags.`ray_lt.role` = 'trial' and attributes.status = '{status}'"
    )


def _stages(uri: str, experiment: str, kind: str, reused: bool):
    flag = "true" if reused else "false"
    return _runs(
        uri,
        experiment,
        f"tags.`ray_lt.stage_kind` = '{kind}' and tags.`ray_lt.reused` = '{flag}'",
    )


def _fixture_pipeline(sweep: str):
    os.environ["CLUSTER_SWEEP"] = sweep
    try:
        spec = importlib.util.spec_from_file_location(f"cluster_sweep_{sweep}", FIXTURE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        del os.environ["CLUSTER_SWEEP"]
    return module.pipeline


@pytest.fixture(scope="module")
def shared(cluster, server, store_uri):
    """Eight concurrent trials need one CE stage, whose worker SIGKILLs itself at epoch 2."""
    proc = _sweep(
        cluster, store_uri, server.uri, "shared", env={"RAY_LT_INJECT_FAULT": "ce:2:kill"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ArtifactStore(store_uri)


def test_eight_trials_train_the_shared_stage_once(shared, server):
    keys = shared.keys()
    assert sum(k.startswith("ce-") for k in keys) == 1
    assert sum(k.startswith("crt-") for k in keys) == 8
    assert len(_stages(server.uri, "cluster-shared", "ce", reused=False)) == 1
    assert len(_stages(server.uri, "cluster-shared", "ce", reused=True)) == 7
    assert len(_stages(server.uri, "cluster-shared", "crt", reused=False)) == 8
    assert len(_trials(server.uri, "cluster-shared", "FINISHED")) == 8


def test_killed_worker_resumes_from_its_last_epoch_checkpoint(shared):
    ce = shared.open(next(k for k in shared.keys() if k.startswith("ce-")))
    metrics = ce.metrics()
    # Resumed from a checkpoint, not from epoch 0. Killed right after reporting epoch 2, the
    # worker may die before Ray Train's controller registers that last checkpoint: then epoch 1's.
    assert metrics["start_epoch"] in (1, 2)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    marker = Path(shared.train_dir()) / "_faults" / f"{ce.key}-epoch2"
    assert marker.exists()  # the worker really killed itself


def test_trials_ran_on_both_worker_nodes(shared, cluster):
    nodes = Counter()
    for key in shared.keys():
        node_id = shared.open(key).metrics()["node"]["ray_node_id"]
        nodes[cluster.node_name(node_id)] += 1
    assert set(nodes) == {"w1", "w2"}, nodes  # never the head: it has no CPUs
    # every artifact and run is in the shared store and the server, wherever it ran
    assert sum(nodes.values()) == 9


def test_driver_sigkill_then_resume_reruns_nothing_finished(cluster, server, store_uri):
    name = "cluster-resume"
    proc = subprocess.Popen(
        _command(cluster, store_uri, server.uri),
        cwd=ROOT,
        env=_env("resume"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while len(_trials(server.uri, name, "FINISHED")) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished in 300 s"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = {r.data.tags["ray_lt.trial_id"] for r in _trials(server.uri, name, "FINISHED")}
    assert 2 <= len(done_before) < 6, "the kill came too late to test anything"

    resumed = _sweep(cluster, store_uri, server.uri, "resume", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished = _trials(server.uri, name, "FINISHED")
    assert len(finished) == 6
    per_trial = Counter(r.data.tags["ray_lt.trial_id"] for r in finished)
    assert all(per_trial[t] == 1 for t in done_before)  # finished trials were not re-run
    stages = _stages(server.uri, name, "ce", reused=False)
    trained = Counter(r.data.tags["ray_lt.stage_key"] for r in stages)
    assert max(trained.values()) == 1  # no stage was trained twice
    pipeline = _fixture_pipeline("resume")
    keys = {pipeline({"variant": v, "seed": 0}).key for v in range(6)}
    assert keys <= set(ArtifactStore(store_uri).keys())


def test_tracking_server_lost_mid_sweep_is_mirrored_on_resume(cluster, store_uri, tmp_path):
    name = "cluster-lost"
    db, port = tmp_path / "mlflow.db", None
    server = TrackingServer(f"sqlite:///{db}", str(tmp_path / "artifacts")).start()
    port = server.port
    proc = subprocess.Popen(
        _command(cluster, store_uri, server.uri),
        cwd=ROOT,
        env=_env("lost"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not _runs(server.uri, name, "tags.`ray_lt.role` = 'trial'"):
            assert time.monotonic() < deadline, "no trial started in 300 s"
            time.sleep(0.5)
    finally:
        server.stop()  # the server goes away mid-sweep
    out, _ = proc.communicate(timeout=600)
    (cluster.logdir / "sweep-lost.log").write_text(out)
    assert proc.returncode == 0, out[-3000:]  # the trials still finished
    store = ArtifactStore(store_uri)
    assert store.records("mirror/cluster-lost")  # what MLflow missed is kept in the store
    pipeline = _fixture_pipeline("lost")
    keys = {pipeline({"variant": v, "seed": 0}).key for v in range(3)}
    assert keys <= set(store.keys())  # results are in the store

    server = TrackingServer(f"sqlite:///{db}", str(tmp_path / "artifacts"), port=port).start()
    try:
        resumed = _sweep(cluster, store_uri, server.uri, "lost", "--resume")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "mirrored" in resumed.stdout
        assert len(_trials(server.uri, name, "FINISHED")) == 3
        logged = {r.data.tags["ray_lt.stage_key"] for r in _stages(server.uri, name, "ce", False)}
        assert logged == keys
        assert not store.records("mirror/cluster-lost")
    finally:
        server.stop()


def test_sixty_four_tiny_trials(cluster, server, store_uri):
    proc = _sweep(cluster, store_uri, server.uri, "load")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(_trials(server.uri, "cluster-load", "FINISHED")) == 64
    assert len(_stages(server.uri, "cluster-load", "ce", reused=False)) == 64
    pipeline = _fixture_pipeline("load")
    keys = {pipeline({"variant": v, "seed": 0}).key for v in range(64)}
    assert len(keys) == 64 and keys <= set(ArtifactStore(store_uri).keys())
    assert proc.stdout.count("  OK ") == 64


def test_stopped_node_mid_stage_continues_on_the_other(cluster, server, store_uri):
    name = "cluster-node"
    key = _fixture_pipeline("node")({"variant": 0, "seed": 0}).key
    store = ArtifactStore(store_uri)
    train = Path(store.train_dir()) / key
    proc = subprocess.Popen(
        _command(cluster, store_uri, server.uri),
        cwd=ROOT,
        env=_env("node"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    snapshot = train / "checkpoint_manager_snapshot.json"
    # at least one epoch's checkpoint is registered by Ray Train (not just being written)
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.5)
    workers = cluster.actors("RayTrainWorker")
    assert len(workers) == 1
    victim = cluster.node_name(workers[0]["node_id"])
    assert victim in ("w1", "w2")
    cluster.kill_node(victim)  # the whole node: raylet, object store, every worker

    out, _ = proc.communicate(timeout=600)
    (cluster.logdir / "sweep-node.log").write_text(out)
    assert proc.returncode == 0, out[-3000:]
    metrics = store.open(key).metrics()
    assert metrics["start_epoch"] >= 1  # resumed from its checkpoint, not from epoch 0
    survivor = cluster.node_name(metrics["node"]["ray_node_id"])
    assert survivor in ("w1", "w2") and survivor != victim
    assert len(_trials(server.uri, name, "FINISHED")) == 1
