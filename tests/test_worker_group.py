"""Every method's stage kinds train in a real Ray Train worker group, and give exactly what
the same stages give inline (``Resources(num_workers=0)``, the trial's own process).

The experiment smoke tests (test_experiments_smoke.py and the like) run their sweeps inline,
so that a worker group's start-up does not make most of their time; this module is where each
stage kind meets the worker-group path: its config through ``train_loop_config``, its inputs read
from the store by the worker, its artifact published by rank 0, one fit for a trial's stages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_lt.artifacts import ArtifactStore
from ray_lt.experiment import load_experiment
from ray_lt.objective import get_objective
from ray_lt.pipeline import TrialContext, run_pipeline
from ray_lt.preflight import call_pipeline
from tests.test_pipeline import fits_of

ROOT = Path(__file__).resolve().parent.parent

# one trial of each method's smoke sweep, chosen to hold every stage kind the method has
TRIALS = {
    "cbd_ens": {"variant": {"method": "cbd", "teachers": "vanilla1+data_aug1", "alpha": 0.4}},
    "ssd_lt": {"variant": {"row": "ssd"}},
    "cbe": {"row": "experts+calibration"},
}


@pytest.mark.ray
@pytest.mark.parametrize("method", sorted(TRIALS))
def test_each_stage_kind_trains_in_a_worker_group_as_it_does_inline(
    ray_session, tmp_path, method, monkeypatch
):
    exp = load_experiment(str(ROOT / "experiments" / f"{method}.py"), smoke=True)
    final = call_pipeline(exp, {**TRIALS[method], "seed": 0})
    fits = fits_of(monkeypatch)
    grouped = run_pipeline(final, TrialContext(store_uri=str(tmp_path / "group")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU worker: the same float sums, bit for bit
    try:
        inline = run_pipeline(final, TrialContext(str(tmp_path / "inline"), in_process="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert [o.spec.key for o in grouped] == [o.spec.key for o in inline]
    assert not any(o.reused for o in grouped + inline)
    # one fit trained every stage that does not run in the trial (cbe_calibrate does), and its
    # checkpoints went once they were all published
    in_worker = [o.spec.key for o in grouped if not get_objective(o.spec.kind).in_trial]
    assert fits == [in_worker], fits
    train_dir = Path(ArtifactStore(tmp_path / "group").train_dir())
    assert not [p.name for p in train_dir.iterdir() if p.name in in_worker]
    for g, i in zip(grouped, inline, strict=True):
        kind = g.spec.kind
        assert str(g.artifact.metrics()["test"]) == str(i.artifact.metrics()["test"]), kind
        weights, expected = g.artifact.state_dict(), i.artifact.state_dict()
        assert weights.keys() == expected.keys(), kind
        assert all(weights[k].equal(expected[k]) for k in weights), kind
