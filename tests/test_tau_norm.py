"""τ-norm (``tau_norm``): the weight transform, the bias convention, the selection of τ on the
validation split of a tiny CE trained in-process, the recipe's CE reuse, bad params, and the
experiment file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ray_lt.data import load_dataset
from ray_lt.engine import LocalSession, StageRun, run_stage
from ray_lt.errors import ConfigError
from ray_lt.experiment import load_experiment
from ray_lt.objective import UpstreamArtifact, get_objective, make_objective
from ray_lt.recipes import baseline
from ray_lt.spec import StageSpec, TrainSpec
from ray_lt.stages.tau_norm import TAUS, TauNormHead, choose_tau, tau_normalize
from ray_lt.stages.upstream import rebuild
from tests.conftest import TINY, tiny_ce

ROOT = Path(__file__).parent.parent
EXPERIMENT = ROOT / "experiments" / "tau_norm_cifar100_lt.py"


def test_transform_against_hand_computed_values():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [6.0, -8.0]])
    # norms: ||(3, 4)|| = 5, ||(0, 2)|| = 2, ||(6, -8)|| = 10
    # norm ** 0.5: sqrt(5) = 2.2360680, sqrt(2) = 1.4142136, sqrt(10) = 3.1622777
    # rows / norm ** 0.5: (3, 4) / 2.2360680 = (1.3416408, 1.7888544)
    #                     (0, 2) / 1.4142136 = (0.0, 1.4142136)
    #                     (6, -8) / 3.1622777 = (1.8973666, -2.5298221)
    expected = torch.tensor([[1.3416408, 1.7888544], [0.0, 1.4142136], [1.8973666, -2.5298221]])
    assert torch.allclose(tau_normalize(w, 0.5), expected, atol=1e-6, rtol=0)


def test_tau_zero_is_the_ce_classifier_without_bias_and_tau_one_unit_rows():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 5)
    f = torch.randn(6, 8)
    w = linear.weight.detach()
    with torch.no_grad():
        zero = TauNormHead(w, 0.0)(f)
        assert torch.equal(zero, F.linear(f, w))  # exactly: ||w_i|| ** 0 == 1
        assert torch.allclose(zero, linear(f) - linear.bias, atol=1e-6)  # the bias is dropped
    assert torch.allclose(tau_normalize(w, 1.0).norm(dim=1), torch.ones(5), atol=1e-6)
    zero_row = tau_normalize(torch.zeros(2, 3), 1.0)  # a dead class stays zero, never NaN
    assert torch.equal(zero_row, torch.zeros(2, 3))


def test_ties_choose_the_smallest_tau():
    assert choose_tau((0.0, 0.5, 1.0), [0.25, 0.75, 0.5]) == 0.5
    assert choose_tau((0.0, 0.5, 1.0), [0.5, 0.75, 0.75]) == 0.5
    assert choose_tau((1.0, 0.3, 0.7), [0.5, 0.5, 0.5]) == 0.3  # smallest value, not first


@pytest.fixture(scope="module")
def trained_ce(tmp_path_factory):
    """A tiny CE trained 2 epochs in-process, as the tau_norm stage's ``features`` artifact."""
    ce, out = tiny_ce(epochs=2), tmp_path_factory.mktemp("ce")
    _run(ce, out, {})
    doc = json.loads((out / "spec.json").read_text())
    weights = load_file(out / "model.safetensors")
    return ce, {"features": UpstreamArtifact(key=ce.key, spec=doc, state_dict=weights)}


def _run(spec, out, inputs):
    run = StageRun(
        spec=spec,
        objective=get_objective(spec.kind),
        data=load_dataset(spec.data),
        inputs=inputs,
        out_dir=str(out),
    )
    return run_stage(run, LocalSession())


def _tau_norm(ce: StageSpec | None, train: dict | None = None, **params) -> StageSpec:
    """A tau_norm stage on the tiny data; ``ce=None`` leaves out its input."""
    train_spec = TrainSpec(**{"epochs": 0, "batch_size": 32, "augment": "none", **(train or {})})
    inputs = {"features": ce} if ce is not None else {}
    return StageSpec(kind="tau_norm", data=TINY, train=train_spec, params=params, inputs=inputs)


@pytest.mark.parametrize("select", ["last", "best"])
def test_chosen_tau_is_the_val_argmax_and_the_reported_val(trained_ce, tmp_path, select):
    ce, inputs = trained_ce
    spec = _tau_norm(ce, train={"select": select})
    summary = _run(spec, tmp_path, inputs)
    assert summary["status"] == "ok" and summary["history"] == []  # nothing trained
    table = pq.read_table(tmp_path / "tables" / "tau_selection.parquet").to_pydict()
    taus, accs = np.array(table["tau"]), np.array(table["val_overall"])
    assert taus.tolist() == list(TAUS) and table["chosen"].count(True) == 1
    best = taus[accs == accs.max()].min()  # the argmax; ties -> the smallest tau
    chosen = taus[table["chosen"]][0]
    assert chosen == best
    # the engine's own evaluation of the exported model is the recorded accuracy of that tau
    assert summary["val"]["overall"] == accs[table["chosen"]][0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val"]["overall"] == summary["val"]["overall"]
    weights = load_file(tmp_path / "model.safetensors")
    assert weights["head.tau"].item() == chosen
    assert torch.equal(weights["head.weight"], inputs["features"].state_dict["head.weight"])
    # the exported test logits are the CE features against the tau-normalised rows, no bias
    test = pq.read_table(tmp_path / "tables" / "test.parquet")
    feats = torch.tensor(test.column("features").to_pylist())
    logits = torch.tensor(test.column("logits").to_pylist())
    want = F.linear(feats, tau_normalize(weights["head.weight"], chosen))
    assert torch.allclose(logits, want, atol=1e-5)
    # a stage downstream rebuilds it with its tau
    doc = json.loads((tmp_path / "spec.json").read_text())
    model = rebuild(UpstreamArtifact(spec.key, doc, weights), TINY.num_classes)
    assert isinstance(model.head, TauNormHead) and model.head.tau.item() == chosen


def test_recipe_reuses_the_ce_stage():
    for seed in (0, 1):
        tau = baseline("tau_norm", seed)
        assert tau.input_dict["features"].key == baseline("ce", seed).key
        assert tau.input_dict["features"].key == baseline("crt", seed).input_dict["features"].key
        assert tau.train.epochs == 0
    make_objective(baseline("tau_norm", 0)).validate(np.array([500, 100, 5]))


@pytest.mark.parametrize("taus", [(), (1.5,), (-0.1,), ("a",), (True,), (0.5, 0.5), 0.5, None])
def test_bad_taus_are_one_config_error_line(taus):
    with pytest.raises(ConfigError, match="tau_norm taus must be") as info:
        make_objective(_tau_norm(tiny_ce(), taus=taus))
    assert "\n" not in str(info.value)


def test_bad_stage_is_one_config_error_line():
    counts = load_dataset(TINY).class_counts
    cosine = StageSpec(
        kind="ce",
        data=TINY,
        train=tiny_ce().train,
        params={"backbone": "resnet8", "head": "cosine"},
    )
    cases = {
        "set epochs=0": _tau_norm(tiny_ce(), train={"epochs": 1}),
        "needs an input named 'features'": _tau_norm(None),
        "needs an upstream linear head": _tau_norm(cosine),
    }
    for match, bad in cases.items():
        with pytest.raises(ConfigError, match=match) as info:
            make_objective(bad).validate(counts)
        assert "\n" not in str(info.value)


def test_experiment_loads_with_and_without_smoke():
    exp = load_experiment(EXPERIMENT)
    smoke = load_experiment(EXPERIMENT, smoke=True)
    assert exp.seeds == (0, 1, 2) and smoke.seeds == (0,)
    assert smoke.name == "tau_norm_cifar100_lt-smoke"
    full = exp.pipeline({"method": "tau_norm", "seed": 1})
    assert full.kind == "tau_norm" and full.data.imbalance == 100.0
    assert full.input_dict["features"].key == exp.pipeline({"method": "ce", "seed": 1}).key
    assert full.input_dict["features"].param_dict == {"backbone": "resnet32"}
    small = smoke.pipeline({"method": "tau_norm", "seed": 0})
    ce = small.input_dict["features"]
    assert ce.param_dict == {"backbone": "resnet8"} and ce.train.epochs == 1
    assert small.train.epochs == 0
