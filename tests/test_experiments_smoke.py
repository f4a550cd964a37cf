"""Every shipped experiment's smoke variant runs end to end through the CLI (real Ray, MLflow,
Parquet), and its report builds from the runs it logged. The quickstart's is in
test_console.py, whose console test runs it and its report."""

from __future__ import annotations

import pytest

from ray_lt.artifacts import ArtifactStore
from tests.cli import smoke_sweep
from tests.conftest import requires_cifar

pytestmark = pytest.mark.ray


@requires_cifar
def test_ce_crt_cifar100_lt_smoke(tmp_path, ray_head):
    out = smoke_sweep("experiments/ce_crt_cifar100_lt.py", tmp_path, head=ray_head)
    assert "method=ce" in out and "method=crt" in out
    store = ArtifactStore(tmp_path / "ray_lt_store")
    ce = store.open(next(k for k in store.keys() if k.startswith("ce-")))
    assert ce.table("test").num_rows == 10_000
    assert sum(ce.table("per_class")["train_count"].to_pylist()) == 10_847


def test_cbd_smoke(tmp_path, ray_head):
    out = smoke_sweep("experiments/cbd.py", tmp_path, head=ray_head)
    assert "alpha=0" in out and "alpha=0.4" in out
    keys = ArtifactStore(tmp_path / "ray_lt_store").keys()
    assert sum(k.startswith("cbd_teacher-") for k in keys) == 1


def test_cbd_ens_smoke(tmp_path, ray_head):
    out = smoke_sweep("experiments/cbd_ens.py", tmp_path, head=ray_head)
    # the ablation rows: a CE baseline, no distillation, one teacher, two teachers
    assert "method=ce" in out and "teachers=vanilla1+data_aug1" in out
    keys = ArtifactStore(tmp_path / "ray_lt_store").keys()
    assert sum(k.startswith("cbd_teacher-") for k in keys) == 2
    assert sum(k.startswith("cbd_student-") for k in keys) == 3
