"""experiments/ssd_lt.py's smoke variant end to end through the CLI (real Ray, MLflow, Parquet),
its report with both heads' columns, and the ImageNet-LT file failing clearly before any trial."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.experiment import load_experiment
from tests.cli import ROOT, smoke_sweep


@pytest.mark.ray
def test_ssd_lt_smoke(tmp_path, ray_head):
    out = smoke_sweep("experiments/ssd_lt.py", tmp_path, head=ray_head)
    assert "soft_overall" in out and "row=plain_teacher" in out and "row=ssd_finetune" in out
    table = next(tmp_path.glob("reports/*/table.csv")).read_text()
    assert "soft_overall" in table.splitlines()[0]
    store = ArtifactStore(tmp_path / "ray_lt_store")
    keys = store.keys()
    # three rows of one seed share stage I; the LWS teacher serves the full and fine-tune rows
    assert sum(k.startswith("ssd_feature-") for k in keys) == 1
    assert sum(k.startswith("ssd_distill-") for k in keys) == 2  # LWS teacher, plain teacher
    assert sum(k.startswith("lws-") for k in keys) == 2  # stage II and the fine-tune
    distill = [store.open(k) for k in keys if k.startswith("ssd_distill-")]
    assert all("soft_overall" in a.metrics()["test"] for a in distill)


def test_smoke_variant_is_small_and_reports_both_heads():
    exp = load_experiment(ROOT / "experiments" / "ssd_lt.py")
    assert exp.seeds == (0, 1, 2) and "soft_overall" in exp.report_metrics
    assert exp.smoke is not None and exp.smoke.seeds == (0,)
    assert len(exp.smoke.param_space["variant"]["grid_search"]) <= 4


def test_imagenet_lt_without_its_files_fails_clearly_before_any_trial(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_lt.sweep",
            str(ROOT / "experiments" / "ssd_lt_imagenet_lt.py"),
            "--store",
            str(tmp_path / "s"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "RAY_LT_DATA": str(tmp_path / "no_data")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "ImageNet_LT" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s" / "_tune").exists()
    # the official settings are what the file promises
    spec = load_experiment(ROOT / "experiments" / "ssd_lt_imagenet_lt.py").pipeline(
        {"seed": 0, "finetune": False}
    )
    stage2 = spec.input_dict["teacher"]
    stage1 = stage2.input_dict["features"]
    assert stage1.param_dict["queue_size"] == 115_712 and stage1.param_dict["hidden_dim"] == 2048
    assert stage1.param_dict["backbone"] == "resnext50_32x4d" and stage1.train.epochs == 135
    assert stage2.train.batch_size == 512 and stage2.train.lr == 0.2 and stage2.train.epochs == 5
    assert spec.param_dict["temperature"] == 2.0 and spec.train.schedule == "cosine"
