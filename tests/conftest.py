"""Shared fixtures: tiny synthetic data, stage specs, and where the real CIFAR-100 lives."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ray_lt.data.spec import DataSpec
from ray_lt.spec import StageSpec, TrainSpec

TINY = DataSpec(
    name="synthetic_lt",
    num_classes=4,
    max_per_class=48,
    imbalance=4.0,
    test_per_class=12,
    val_per_class=4,
)


def tiny_ce(epochs: int = 2, **train: object) -> StageSpec:
    """A CE stage small enough for a few CPU seconds."""
    return StageSpec(
        kind="ce",
        data=TINY,
        train=TrainSpec(
            **{"epochs": epochs, "batch_size": 32, "lr": 0.05, "schedule": "cosine", **train}
        ),
        params={"backbone": "resnet8"},
    )


def tiny_crt(upstream: StageSpec, kind: str = "crt", **train: object) -> StageSpec:
    return StageSpec(
        kind=kind,
        data=TINY,
        train=TrainSpec(
            **{
                "epochs": 1,
                "batch_size": 32,
                "lr": 0.05,
                "schedule": "cosine",
                "sampler": "class_balanced",
                **train,
            }
        ),
        inputs={"features": upstream},
    )


def cifar_root() -> Path | None:
    """$RAY_LT_DATA when it holds CIFAR-100 as Parquet, else None (tests skip)."""
    root = os.environ.get("RAY_LT_DATA")
    if root and (Path(root) / "cifar100" / "train.parquet").exists():
        return Path(root).resolve()
    return None


requires_cifar = pytest.mark.skipif(
    cifar_root() is None,
    reason="CIFAR-100 Parquet not found: set RAY_LT_DATA to a folder with cifar100/train.parquet",
)


@pytest.fixture(scope="module", autouse=True)
def _no_in_process_ray_left_behind():
    """Fail the module that called ``ray.init`` for a Ray of its own in the pytest process.

    Such a Ray turns on Ray's token authentication for the whole process (``RAY_AUTH_MODE=token``
    in its environment, and state no ``ray.shutdown`` undoes): afterwards no driver in that
    process can create an actor on the session's Ray head, which runs without it, and every
    subprocess inherits the variable. Which tests then failed would depend on which module ran
    before on the same pytest-xdist worker. Start such a Ray in a subprocess instead
    (test_security_and_tracking.py does), or drive the shared head (``ray_session``).
    """
    before = os.environ.get("RAY_AUTH_MODE")
    yield
    after = os.environ.get("RAY_AUTH_MODE")
    if after != before:
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before
        if after == "token":
            pytest.fail(
                "this module started a Ray of its own in the pytest process (RAY_AUTH_MODE became "
                "'token'); start it in a subprocess or use the ray_session fixture"
            )


@pytest.fixture(scope="module")
def ray_session(ray_head):
    """This process as a Ray driver for a module's tests, on the session's Ray head (``ray_head``:
    at least 4 CPUs, and the dashboard that serves the state API Ray Train's clean-up asks)."""
    import ray

    from tests.local_cluster import ENV

    os.environ["RAY_AUTH_MODE"] = ENV["RAY_AUTH_MODE"]  # as the head runs; undone at module end
    ray.init(address=ray_head, logging_level="ERROR")
    yield
    ray.shutdown()


# The shared head's folder: made by the main pytest process (which, with pytest-xdist, starts
# the workers after pytest_configure, so they inherit it) and removed, head and all, at its end.
HEAD_DIR_ENV = "RAY_LT_TEST_HEAD_DIR"


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the main process, not a pytest-xdist worker
        os.environ[HEAD_DIR_ENV] = tempfile.mkdtemp(prefix="ray-lt-test-head-")


def pytest_unconfigure(config):
    folder = os.environ.get(HEAD_DIR_ENV)
    if hasattr(config, "workerinput") or not folder:
        return
    from tests.local_cluster import stop_nodes

    record = Path(folder) / "head.json"
    if record.exists():
        head = json.loads(record.read_text())
        stop_nodes(head["pids"], head["temp_dir"])
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head():
    """The address of one Ray head that the session's CLI sweeps join with ``--address`` when
    their subject is not the sweep's own in-process Ray, and that ``ray_session`` drives: each
    then skips starting and stopping a Ray (about 12 CPU seconds). The first test that asks
    starts it, with 2 CPUs for each pytest-xdist worker and 4 at least (a streamed stage's Ray
    Data tasks run beside it). All workers share it: an idle Ray head costs about 0.1 CPU seconds
    a second, a second head over the session's 20 minutes would cost two minutes of CPU. The main
    pytest process stops it at the end (pytest_unconfigure)."""
    from tests.local_cluster import LocalCluster

    folder = Path(os.environ[HEAD_DIR_ENV])
    with open(folder / "head.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker starts it, the others wait and join
        record = folder / "head.json"
        if not record.exists():
            cpus = 2 * max(2, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
            head = LocalCluster(folder / "logs", workers=0, head_cpus=cpus)
            (folder / "logs").mkdir(exist_ok=True)
            try:
                head.start()
            except BaseException:
                head.stop()
                raise
            record.write_text(json.dumps(head.record()))
        return json.loads(record.read_text())["address"]
