"""CBE through the CLI: the smoke sweep of experiments/cbe.py on a real local Ray and MLflow
(generalist, calibrated, prior-only and oracle rows sharing one generalist and three experts),
its report, and the ImageNet-LT / Places-LT files failing clearly before any trial."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ray_lt.artifacts import ArtifactStore
from tests.cli import INLINE, ROOT, ray_args, run_cli

pytestmark = pytest.mark.ray


def test_cbe_smoke_sweep_and_report(tmp_path, ray_head):
    head = ray_args(ray_head)
    sweep = run_cli("ray_lt.sweep", "experiments/cbe.py", tmp_path, *head, *INLINE, head=ray_head)
    assert "OK" in sweep.stdout and "ERROR" not in sweep.stdout.split("sweep '")[-1]
    report = run_cli("ray_lt.report", "experiments/cbe.py", tmp_path).stdout
    for row in (
        "row=generalist",
        "row=experts+calibration",
        "row=prior offset only",
        "row=oracle",
    ):
        assert row in report, report
    for name in ("table.md", "table.csv", "per_class.png"):
        assert list(tmp_path.glob(f"reports/*/{name}")), name
    store = ArtifactStore(tmp_path / "ray_lt_store")
    keys = store.keys()
    count = {k: sum(key.startswith(f"{k}-") for key in keys) for k in (
        "ce", "cbe_expert", "cbe_logits", "cbe_calibrate")}  # fmt: skip
    # four rows share one generalist, three experts and one logits stage
    assert count == {"ce": 1, "cbe_expert": 3, "cbe_logits": 1, "cbe_calibrate": 3}
    logits = store.open(next(k for k in keys if k.startswith("cbe_logits-")))
    assert logits.table("experts")["name"].to_pylist() == ["expert0", "expert1", "expert2"]
    assert logits.table("test").num_rows == 1000 and logits.table("val").num_rows == 200


def _cli(tmp_path, file, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "ray_lt.sweep", str(ROOT / file), "--store", str(tmp_path / "s"),
         "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
        cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    return proc.returncode, lines, proc.stderr


@pytest.mark.parametrize(
    "file, env, expected",
    [
        ("experiments/cbe_imagenet_lt.py", {"RAY_LT_DATA": "/no/such/data"}, "ImageNet_LT"),
        ("experiments/cbe_places_lt.py", {"RAY_LT_RESNET152_WEIGHTS": ""},
         "set RAY_LT_RESNET152_WEIGHTS"),
        ("experiments/cbe_places_lt.py",
         {"RAY_LT_RESNET152_WEIGHTS": "/no/such/w.safetensors", "RAY_LT_DATA": "/no/such/data"},
         "Places_LT"),
    ],
)  # fmt: skip
def test_full_scale_files_fail_clearly(tmp_path, file, env, expected):
    code, lines, stderr = _cli(tmp_path, file, env)
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and expected in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "s" / "_tune").exists()  # failed before any trial ran
