"""The engine's options for later methods, in-process: float-row inputs, extra heads, best-epoch
selection with patience, evaluate-only stages, extra tables, batch-statistics modules, in-trial
stages. Two small objectives registered here exercise them on a learnable Gaussian problem."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ray_lt.artifacts import ArtifactStore
from ray_lt.data import load_dataset
from ray_lt.data.spec import LTDataset, Split
from ray_lt.engine import LocalSession, StageRun, _set_train_mode, run_stage
from ray_lt.errors import ConfigError
from ray_lt.objective import OBJECTIVES, Objective, get_objective
from ray_lt.pipeline import TrialContext, run_pipeline
from ray_lt.spec import StageSpec, TrainSpec
from tests.conftest import TINY, tiny_ce

C, D = 4, 6


def _rows(n_per_class: int, seed: int) -> Split:
    """Gaussian clusters in D dims, one per class, as float32 rows."""
    g = np.random.default_rng(seed)
    centres = np.eye(C, D, dtype=np.float32) * 2.0
    labels = np.repeat(np.arange(C), n_per_class).astype(np.int64)
    x = centres[labels] + g.normal(0, 1.0, (len(labels), D)).astype(np.float32)
    return Split(np.ascontiguousarray(x), labels, np.arange(len(labels), dtype=np.int64))


@dataclass(frozen=True)
class RowParams:
    head_sign: float = -1.0  # the extra head's logits are head_sign * the primary ones


class RowModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.linear(x)


@OBJECTIVES.register("test_rows")
class RowObjective(Objective):
    """A linear classifier on float rows, with a second scored head and an extra table."""

    version = "1"
    Params = RowParams
    in_trial = True

    def prepare_data(self, data: LTDataset, inputs) -> LTDataset:
        return LTDataset(
            name="rows",
            num_classes=C,
            class_names=[str(c) for c in range(C)],
            train=_rows(30, 0),
            val=_rows(10, 1),
            test=_rows(10, 2),
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        )

    def build(self, ctx) -> nn.Module:
        return RowModel()

    def loss(self, model, batch, ctx):
        _, logits = model(batch.x)
        return {"ce": F.cross_entropy(logits, batch.y)}

    def predict(self, model, x):
        f, z = model(x)
        flip = self.params.head_sign * z
        return f, z, {"logits_flip": flip, "norm": z.norm(dim=1, keepdim=True)}

    def export_tables(self, model, ctx):
        return {"extra": pa.table({"num_classes": [ctx.num_classes]})}


def _row_spec(**train) -> StageSpec:
    base = {"epochs": 6, "batch_size": 16, "lr": 0.05, "schedule": "constant", "augment": "none"}
    return StageSpec(kind="test_rows", data=TINY, train=TrainSpec(**{**base, **train}))


def _run(spec: StageSpec, out: Path, session: LocalSession | None = None, **kw) -> dict:
    run = StageRun(
        spec=spec,
        objective=get_objective(spec.kind),
        data=load_dataset(spec.data),
        out_dir=str(out),
        **kw,
    )
    return run_stage(run, session or LocalSession())


def test_float_rows_train_and_extras_are_scored_and_exported(tmp_path):
    session = LocalSession()
    summary = _run(_row_spec(), tmp_path / "a", session)
    assert summary["status"] == "ok" and len(session.reports) == 6
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["test"]["overall"] > 0.7  # learnable clusters
    # the negated head ranks the classes backwards: far worse than the primary head
    assert metrics["test"]["flip_overall"] < 0.3
    assert "val_flip_overall" in session.reports[-1]
    table = pq.read_table(tmp_path / "a" / "tables" / "test.parquet")
    assert {"logits", "logits_flip", "norm", "label", "index"} <= set(table.column_names)
    z = np.stack(table["logits"].to_numpy(zero_copy_only=False))
    flip = np.stack(table["logits_flip"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(flip, -z, rtol=1e-6)
    per_class = pq.read_table(tmp_path / "a" / "tables" / "per_class.parquet")
    assert {"accuracy", "accuracy_flip"} <= set(per_class.column_names)
    extra = pq.read_table(tmp_path / "a" / "tables" / "extra.parquet")
    assert extra["num_classes"].to_pylist() == [C]


def test_float_rows_refuse_image_augmentation(tmp_path):
    with pytest.raises(ConfigError, match="augment='none'"):
        _run(_row_spec(augment="crop_flip"), tmp_path / "a")


def test_best_epoch_is_selected_and_exported(tmp_path):
    session = LocalSession()
    _run(_row_spec(select="best", lr=0.5, schedule="constant"), tmp_path / "a", session)
    scores = [r["val_overall"] for r in session.reports]
    best = int(np.argmax(scores)) + 1  # first epoch with the highest validation accuracy
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["selected_epoch"] == best == session.reports[-1]["best_epoch"]
    assert metrics["val"]["overall"] == pytest.approx(scores[best - 1])


def test_patience_stops_training_early(tmp_path):
    # a learning rate too small to change any prediction: no gain after epoch 1
    session = LocalSession()
    _run(_row_spec(epochs=50, lr=1e-9, patience=3), tmp_path / "a", session)
    assert [r["epoch"] for r in session.reports] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["selected_epoch"] == 1


def test_selection_needs_its_metric(tmp_path):
    with pytest.raises(ConfigError, match="select_metric"):
        _run(_row_spec(select="best", select_metric="val_nope"), tmp_path / "a")


def test_resume_keeps_the_best_epoch(tmp_path):
    spec = _row_spec(select="best", lr=0.5, epochs=5)
    _run(spec, tmp_path / "straight")
    ckpt = str(tmp_path / "ckpt")
    marker = str(tmp_path / "marker")
    with pytest.raises(RuntimeError, match="injected"):
        _run(spec, tmp_path / "x", LocalSession(checkpoint_dir=ckpt), fail_at_epoch=3,
             fault_marker=marker)  # fmt: skip
    summary = _run(spec, tmp_path / "resumed", LocalSession(checkpoint_dir=ckpt),
                   fail_at_epoch=3, fault_marker=marker)  # fmt: skip
    assert summary["start_epoch"] == 3
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sel = [json.loads((tmp_path / d / "metrics.json").read_text())["selected_epoch"]
           for d in ("straight", "resumed")]  # fmt: skip
    assert sel[0] == sel[1]


def test_zero_epochs_evaluates_and_exports_only(tmp_path):
    session = LocalSession()
    summary = _run(_row_spec(epochs=0), tmp_path / "a", session)
    assert summary["status"] == "ok" and session.reports == []
    assert (tmp_path / "a" / "tables" / "val.parquet").exists()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["history"] == [] and 0.0 <= metrics["test"]["overall"] <= 1.0


def test_new_train_fields_enter_the_key_only_when_set():
    spec = tiny_ce()
    assert not {"select", "select_metric", "patience"} & set(spec.config()["train"])
    changed = StageSpec(kind="ce", data=TINY, train=spec.train.replace(patience=3),
                        params=spec.params)  # fmt: skip
    assert changed.config()["train"]["patience"] == 3 and changed.key != spec.key
    assert StageSpec.from_dict(changed.to_dict()).key == changed.key
    with pytest.raises(ConfigError, match="select"):
        TrainSpec(select="first")


def test_batch_stats_marker_keeps_frozen_batchnorm_in_train_mode():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3)), nn.Linear(3, 2))
    for p in list(model[0].parameters()) + list(model[1].parameters()):
        p.requires_grad_(False)
    _set_train_mode(model)
    assert not model[0].training and not model[1][0].training and model[2].training
    model[1].update_batch_stats = True
    _set_train_mode(model)
    assert not model[0].training and model[1][0].training
    before = model[1][0].running_mean.clone()
    model(torch.randn(8, 3) + 5.0)
    assert not torch.equal(before, model[1][0].running_mean)


def test_in_trial_stage_runs_in_the_trial_process(tmp_path):
    spec = _row_spec(epochs=2)
    outcome = run_pipeline(spec, TrialContext(store_uri=str(tmp_path / "store")))[-1]
    assert not outcome.reused and outcome.artifact.metrics()["test"]["overall"] > 0.5
    assert not ray.is_initialized()  # no Ray Train run was made (its fit would start a Ray)
    # LocalSession's checkpoint went once the stage was published
    assert not (Path(ArtifactStore(tmp_path / "store").train_dir()) / spec.key).exists()
    assert run_pipeline(spec, TrialContext(store_uri=str(tmp_path / "store")))[-1].reused
