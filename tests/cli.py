"""Run the package's CLIs on an experiment file in a subprocess, as a user would (real Ray)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import cifar_root
from tests.local_cluster import ENV

ROOT = Path(__file__).resolve().parent.parent


def sweep_cmd(file: str | Path, workdir: Path, *extra: str, head: str | None = None) -> list[str]:
    """``python -m ray_lt.sweep FILE`` with its store and SQLite MLflow in ``workdir``, then
    ``extra``: on the Ray head at ``head`` (the ``ray_head`` fixture), else in a Ray of its own
    on 2 CPUs."""
    return [
        sys.executable,
        "-m",
        "ray_lt.sweep",
        str(file),
        "--store",
        str(workdir / "store"),
        "--tracking-uri",
        tracking_db(workdir),
        *ray_args(head),
        *extra,
    ]


def ray_args(head: str | None) -> list[str]:
    """A sweep's Ray: the head at ``head``, else an in-process one on 2 CPUs."""
    return ["--address", head] if head else ["--num-cpus", "2"]


def tracking_db(workdir: Path) -> str:
    """``sqlite:///WORKDIR/mlflow.db``; a new one starts as a copy of an empty MLflow database.

    MLflow runs every one of its alembic migrations on a new SQLite file, about 2 s of CPU in the
    sweep that creates it; a copy of the file MLflow left the first time is the same database.
    What a sweep does with a database that is new, half-made or shared by processes starting
    together is tested on databases made from nothing (test_tracking_setup.py).
    """
    path = workdir / "mlflow.db"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_database(), path)
    return f"sqlite:///{path}"


@functools.cache
def _empty_database() -> Path:
    """A new SQLite MLflow database, made once per test process by MLflow itself."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="ray-lt-empty-mlflow-"))
    atexit.register(shutil.rmtree, folder, True)
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


# The ``ray_head`` fixture's cluster runs without Ray's token authentication; so must its clients.
HEAD_ENV = {"RAY_AUTH_MODE": ENV["RAY_AUTH_MODE"]}


def run_cli(
    module: str, file: str, workdir: Path, *extra: str, head: str | None = None
) -> subprocess.CompletedProcess:
    """``python -m MODULE ROOT/FILE --smoke EXTRA...`` in ``workdir``, a client of the Ray head
    at ``head`` if given; it must exit 0."""
    env = {**os.environ, **(HEAD_ENV if head else {})}
    if module == "ray_lt.sweep":
        tracking_db(workdir)  # where the sweep's default tracking URI points
    if cifar_root() is not None:
        env["RAY_LT_DATA"] = str(cifar_root())
    proc = subprocess.run(
        [sys.executable, "-m", module, str(ROOT / file), "--smoke", *extra],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


# What an experiment's smoke test checks is its stages, objectives and report; each stage kind in
# a Ray Train worker group, and every worker-group behaviour, is tested in test_worker_group.py,
# test_sweep.py and test_cluster.py. So these sweeps train inline: a worker group's start-up
# (about 20 s a trial on 2 cores) would be most of their time.
INLINE = ("--num-workers", "0")


def smoke_sweep(file: str, workdir: Path, *extra: str, head: str | None = None) -> str:
    """The smoke sweep (on the Ray head at ``head``, else in its own Ray on 2 CPUs), stages
    inline, then its report; every report file exists. Report stdout."""
    sweep = run_cli("ray_lt.sweep", file, workdir, *ray_args(head), *INLINE, *extra, head=head)
    assert "OK" in sweep.stdout and "ERROR" not in sweep.stdout.split("sweep '")[-1]
    report = run_cli("ray_lt.report", file, workdir)
    assert "Downloading artifacts" not in report.stderr, report.stderr[-2000:]  # no MLflow bars
    for name in ("table.md", "table.tex", "table.csv", "per_class.png"):
        assert list(workdir.glob(f"reports/*/{name}")), name
    return report.stdout
