"""The one training loop, in-process (LocalSession): schedule, exports, resume, NaN, freezing."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from ray_lt.data import load_dataset
from ray_lt.engine import LocalSession, StageRun, lr_at, run_stage
from ray_lt.objective import UpstreamArtifact, get_objective
from ray_lt.spec import TrainSpec
from tests.conftest import TINY, tiny_ce, tiny_crt


def _run(spec, tmp_path, name="out", session=None, inputs=None, **kw):
    run = StageRun(
        spec=spec,
        objective=get_objective(spec.kind),
        data=load_dataset(spec.data),
        inputs=inputs or {},
        out_dir=str(tmp_path / name),
        **kw,
    )
    return run_stage(run, session or LocalSession())


def test_lr_schedules():
    step = TrainSpec(epochs=200, lr=0.1, warmup_epochs=5, milestones=(160, 180), gamma=0.01)
    assert lr_at(step, 0.0) == pytest.approx(0.0, abs=1e-6)
    assert lr_at(step, 2.5) == pytest.approx(0.05)
    assert lr_at(step, 100) == pytest.approx(0.1)
    assert lr_at(step, 170) == pytest.approx(1e-3)
    assert lr_at(step, 190) == pytest.approx(1e-5)
    cos = TrainSpec(epochs=10, lr=0.2, schedule="cosine")
    assert lr_at(cos, 0) == pytest.approx(0.2)
    assert lr_at(cos, 5) == pytest.approx(0.1)
    assert lr_at(cos, 10) == pytest.approx(0.0, abs=1e-12)


def test_ce_trains_reports_and_exports(tmp_path):
    spec = tiny_ce(epochs=2)
    session = LocalSession()
    summary = _run(spec, tmp_path, session=session)
    assert summary["status"] == "ok" and summary["start_epoch"] == 0
    assert [r["epoch"] for r in session.reports] == [1, 2]
    assert all(math.isfinite(r["loss"]) and "loss/ce" in r for r in session.reports)
    assert {"overall", "many", "val_overall"} <= set(session.reports[-1])
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "tables",
        "metrics.json",
        "spec.json",
    }
    data = load_dataset(TINY)
    test = pq.read_table(out / "tables" / "test.parquet")
    assert test.num_rows == len(data.test.labels)
    assert test.column("label").to_pylist() == data.test.labels.tolist()
    assert len(test.column("logits")[0]) == TINY.num_classes
    assert len(test.column("features")[0]) == 64  # resnet8's feature width
    # exported metrics are the accuracy of the exported logits
    logits = torch.tensor(test.column("logits").to_pylist())
    overall = (logits.argmax(1).numpy() == data.test.labels).mean()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["overall"] == pytest.approx(overall)
    per_class = pq.read_table(out / "tables" / "per_class.parquet").to_pydict()
    assert per_class["train_count"] == data.class_counts.tolist()
    assert json.loads((out / "spec.json").read_text())["key"] == spec.key
    assert set(load_file(out / "model.safetensors")) >= {"head.weight", "backbone.conv1.weight"}


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    spec = tiny_ce(epochs=3)
    _run(spec, tmp_path, name="straight")
    ckpt = str(tmp_path / "ckpt")
    marker = str(tmp_path / "fault")
    with pytest.raises(RuntimeError, match="injected fault at epoch 2"):
        _run(
            spec,
            tmp_path,
            name="a",
            session=LocalSession(checkpoint_dir=ckpt),
            fail_at_epoch=2,
            fault_marker=marker,
        )
    resumed = _run(
        spec,
        tmp_path,
        name="b",
        session=LocalSession(checkpoint_dir=ckpt),
        fail_at_epoch=2,
        fault_marker=marker,
    )
    assert resumed["start_epoch"] == 2
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the straight run"


def test_nonfinite_loss_stops_the_stage(tmp_path):
    summary = _run(tiny_ce(epochs=3, lr=1e12, schedule="constant"), tmp_path)
    assert summary["status"] == "nonfinite"
    assert not (tmp_path / "out").exists()  # nothing exported from a diverged run


def test_crt_and_lws_train_only_the_classifier(tmp_path):
    ce = tiny_ce(epochs=1)
    _run(ce, tmp_path, name="ce")
    weights = load_file(tmp_path / "ce" / "model.safetensors")
    doc = json.loads((tmp_path / "ce" / "spec.json").read_text())
    inputs = {"features": UpstreamArtifact(key=ce.key, spec=doc, state_dict=weights)}
    for kind in ("crt", "lws"):
        _run(tiny_crt(ce, kind=kind), tmp_path, name=kind, inputs=inputs)
        after = load_file(tmp_path / kind / "model.safetensors")
        backbone = [k for k in weights if k.startswith("backbone.")]
        assert any("running_mean" in k for k in backbone)
        for k in backbone:  # weights and BatchNorm statistics untouched
            assert torch.equal(weights[k], after[k]), k
    lws = load_file(tmp_path / "lws" / "model.safetensors")
    assert not torch.equal(lws["head.scale"], torch.ones_like(lws["head.scale"]))
    assert torch.equal(lws["head.linear.weight"], weights["head.weight"])
    crt = load_file(tmp_path / "crt" / "model.safetensors")
    assert not torch.equal(crt["head.weight"], weights["head.weight"])


def test_checkpoint_loader_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": Evil()}, ckpt / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        LocalSession(checkpoint_dir=str(ckpt)).last_checkpoint()
