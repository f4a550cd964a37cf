"""ray_lt.pipeline on a real local Ray: a 2-worker DDP stage, upstream tables through the object
store, reuse by key, and the in-process path (same engine, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.pipeline import TrialContext, run_pipeline, upstream
from ray_lt.spec import Resources, with_resources
from tests.conftest import tiny_ce, tiny_crt


def fits_of(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The stage keys of every ``TorchTrainer`` fit made from now on, one list per fit: the
    real ``worker_group.train_batch``, seen on its way in."""
    import ray_lt.worker_group

    fits: list[list[str]] = []
    real = ray_lt.worker_group.train_batch

    def seen(batch, *args, **kwargs):
        fits.append([s.key for s in batch])
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(ray_lt.worker_group, "train_batch", seen)
    return fits


@pytest.mark.ray
def test_ddp_stages_train_in_one_worker_group_then_reuse(ray_session, tmp_path, monkeypatch):
    two = Resources(num_workers=2, cpus_per_worker=1)
    crt = with_resources(tiny_crt(tiny_ce(epochs=2)), two, only_default=False)
    ce = crt.inputs[0][1]
    store = ArtifactStore(tmp_path / "store")
    ctx = TrialContext(store_uri=str(tmp_path / "store"))
    fits = fits_of(monkeypatch)
    first = run_pipeline(crt, ctx)
    assert [o.reused for o in first] == [False, False]
    assert fits == [[ce.key, crt.key]]  # one TorchTrainer fit trained both stages
    # both are published: the fit's checkpoints (its resume state) are gone
    assert not [p.name for p in Path(store.train_dir()).iterdir() if not p.name.startswith("_")]
    metrics = first[0].artifact.metrics()
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    # two ranks each see half of every epoch: the reported throughput counts both
    assert metrics["history"][-1]["images_per_s"] > 0
    # the second stage read the first one's weights, published by rank 0 before it started
    ce_weights, crt_weights = first[0].artifact.state_dict(), first[1].artifact.state_dict()
    convs = [k for k in ce_weights if "conv" in k and k.endswith("weight") and k in crt_weights]
    assert convs and all(ce_weights[k].equal(crt_weights[k]) for k in convs)
    again = run_pipeline(tiny_crt(tiny_ce(epochs=2), lr=0.1), ctx)
    assert [o.reused for o in again] == [True, False]  # resources are not part of the key
    assert store.keys() == sorted([ce.key, crt.key, again[-1].artifact.key])


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
