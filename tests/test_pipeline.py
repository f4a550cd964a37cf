"""ray_lt.pipeline on a real local Ray: a 2-worker DDP stage, upstream tables through the object
store, reuse by key, and the in-process path (same engine, no Ray)."""

from __future__ import annotations

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.pipeline import TrialContext, run_pipeline, upstream
from ray_lt.spec import Resources
from tests.conftest import tiny_ce, tiny_crt


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.ray
def test_ddp_stage_on_two_workers_then_reuse(ray_session, tmp_path):
    ce = tiny_ce(epochs=2).with_resources(Resources(num_workers=2, cpus_per_worker=1))
    crt = tiny_crt(tiny_ce(epochs=2))  # the same CE key: resources are not part of it
    ctx = TrialContext(store_uri=str(tmp_path / "store"))
    first = run_pipeline(ce, ctx)
    assert [o.reused for o in first] == [False]
    metrics = first[0].artifact.metrics()
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    # two ranks each see half of every epoch: the reported throughput counts both
    assert metrics["history"][-1]["images_per_s"] > 0
    second = run_pipeline(crt, ctx)
    assert [o.reused for o in second] == [True, False]
    assert ArtifactStore(tmp_path / "store").keys() == sorted([ce.key, crt.key])


def test_upstream_carries_weights_and_tables(tmp_path):
    ce = tiny_ce(epochs=1)
    ctx = TrialContext(store_uri=str(tmp_path / "store"), in_process="cpu")
    outcome = run_pipeline(ce, ctx)[-1]
    up = upstream(ArtifactStore(tmp_path / "store"), {"features": outcome.artifact.key})
    art = up["features"]
    assert set(art.tables) == {"test", "val", "per_class"}
    assert art.tables["test"].num_rows == len(art.tables["test"].column("label"))
    assert "head.weight" in art.state_dict and art.spec["key"] == ce.key
    # in-process training of the downstream stage reuses the CE artifact
    outcomes = run_pipeline(tiny_crt(ce), ctx)
    assert [o.reused for o in outcomes] == [True, False]
