"""End to end on a real local Ray (2 CPUs), a real SQLite MLflow store and a real artifact store.

One sweep of three trials that all need the same CE stage (tests/fixtures/shared_ce.py), run by
the CLI as a user would, with a fault injected at epoch 2 of the CE stage. Then ``--resume``,
then a corrupted artifact. Counts come from the store and from MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_lt.artifacts import ArtifactStore
from tests.cli import HEAD_ENV, sweep_cmd

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "shared_ce.py"


def _sweep(workdir: Path, head: str, *extra: str, env_extra: dict[str, str] | None = None):
    env = {**os.environ, **HEAD_ENV, "RAY_LT_LOCK_HEARTBEAT_S": "2", "RAY_LT_LOCK_STALE_S": "30"}
    env.update(env_extra or {})
    cmd = sweep_cmd(FIXTURE, workdir, *extra, head=head)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    (workdir / f"sweep{len(list(workdir.glob('sweep*.log')))}.log").write_text(
        proc.stdout + proc.stderr
    )
    return proc


def _runs(workdir: Path, filter_string: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shared-ce")
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)


def _trained(workdir: Path, kind: str) -> int:
    runs = _runs(
        workdir, f"tags.`ray_lt.stage_kind` = '{kind}' and tags.`ray_lt.reused` = 'false'"
    )
    return len(runs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_head):
    workdir = tmp_path_factory.mktemp("sweep")
    proc = _sweep(workdir, ray_head, env_extra={"RAY_LT_INJECT_FAULT": "ce:2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc


def test_shared_stage_is_trained_once(swept):
    workdir, _ = swept
    keys = ArtifactStore(workdir / "store").keys()
    assert sum(k.startswith("ce-") for k in keys) == 1
    assert sum(k.startswith("crt-") for k in keys) == 1  # the diverged cRT stored nothing
    assert _trained(workdir, "ce") == 1
    reused = _runs(workdir, "tags.`ray_lt.stage_kind` = 'ce' and tags.`ray_lt.reused` = 'true'")
    assert len(reused) == 2  # the crt and diverge trials reused it


def test_injected_fault_resumed_at_its_epoch(swept):
    workdir, _ = swept
    store = ArtifactStore(workdir / "store")
    ce = store.open(next(k for k in store.keys() if k.startswith("ce-")))
    metrics = ce.metrics()
    assert metrics["start_epoch"] == 2
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]


def test_nan_trial_fails_and_the_sweep_continues(swept):
    workdir, proc = swept
    finished = _runs(workdir, "tags.`ray_lt.role` = 'trial' and attributes.status = 'FINISHED'")
    failed = _runs(workdir, "tags.`ray_lt.role` = 'trial' and attributes.status = 'FAILED'")
    assert len(finished) == 2 and len(failed) == 1
    assert "non-finite loss" in failed[0].data.tags["ray_lt.error"]
    assert "non-finite loss" in proc.stdout


def test_report_numbers_equal_mlflow_metrics(swept):
    workdir, _ = swept
    out = workdir / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_lt.report",
            str(FIXTURE),
            "--out",
            str(out),
            "--tracking-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    rows = {r["label"]: r for r in csv.DictReader((out / "table.csv").open())}
    finished = _runs(workdir, "tags.`ray_lt.role` = 'trial' and attributes.status = 'FINISHED'")
    assert len(rows) == 2
    for run in finished:
        row = rows[f"method={run.data.params['method']}"]
        for metric in ("overall", "medium", "few"):
            assert float(row[f"{metric}_mean"]) == pytest.approx(run.data.metrics[metric])
    assert (out / "per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| configuration |" in proc.stdout


def test_resume_reruns_nothing_finished(swept, ray_head):
    workdir, _ = swept
    before = len(_runs(workdir, "tags.`ray_lt.role` = 'trial' and attributes.status = 'FINISHED'"))
    proc = _sweep(workdir, ray_head, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = len(_runs(workdir, "tags.`ray_lt.role` = 'trial' and attributes.status = 'FINISHED'"))
    assert after == before  # finished trials were not run again
    assert _trained(workdir, "ce") == 1 and _trained(workdir, "crt") == 1


def test_corrupt_artifact_is_quarantined_and_retrained(swept, ray_head):
    workdir, _ = swept
    store = ArtifactStore(workdir / "store")
    crt = next(k for k in store.keys() if k.startswith("crt-"))
    weights = Path(store.open(crt).local_dir()) / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    proc = _sweep(workdir, ray_head)  # a fresh sweep over the same store
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    quarantined = list((workdir / "store" / "_quarantine").iterdir())
    assert any(p.name.startswith(crt) for p in quarantined)  # kept, never deleted
    assert store.lookup(crt) is not None  # retrained and valid again
    assert _trained(workdir, "crt") == 2 and _trained(workdir, "ce") == 1
    spec = json.loads((Path(store.open(crt).local_dir()) / "spec.json").read_text())
    assert spec["key"] == crt
