"""CBE stages on tiny real data: split rule, open draws, freezing, early stopping, the logits
tables, the calibration fusion against an independent NumPy version, bad input and reuse."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from ray_lt.data.spec import load_dataset
from ray_lt.errors import ConfigError
from ray_lt.models import create_model
from ray_lt.objective import get_objective
from ray_lt.pipeline import TrialContext, run_pipeline, upstream
from ray_lt.recipes import baseline
from ray_lt.recipes.cbe import cbe, splits_from_thresholds
from ray_lt.spec import StageSpec, TrainSpec, walk
from ray_lt.stages.cbe import (
    CalibrationModel,
    Layout,
    apply_num_learnable,
    expert_view,
    in_split,
)
from tests.conftest import TINY, tiny_ce

# TINY's train counts are 48 30 19 12: many {0, 1}, medium {2}, few {3}.
SPLITS = ((30, None), (19, 30), (0, 19))
EXPERT = TrainSpec(epochs=1, batch_size=32, lr=0.02, schedule="cosine", select="best", patience=5)
CALIB = TrainSpec(
    epochs=15, batch_size=256, lr=0.1, weight_decay=5e-4, augment="none", select="best",
    patience=5, schedule="step", milestones=(10,), gamma=0.1,
)  # fmt: skip


def tiny_cbe(**settings) -> StageSpec:
    return cbe(
        0,
        **{
            "splits": SPLITS,
            "open_ratio": 4.0,
            "num_learnable": (-1, 2, 1),
            "data": TINY,
            "backbone": "resnet8",
            "generalist_train": tiny_ce(epochs=1).train,
            "expert_train": EXPERT,
            "calibration_train": CALIB,
            **settings,
        },
    )


def _ctx(tmp) -> TrialContext:
    return TrialContext(store_uri=str(tmp), in_process="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store with the tiny pipeline's full / prior / none / oracle calibrations."""
    root = tmp_path_factory.mktemp("cbe_store")
    runs = {
        name: run_pipeline(tiny_cbe(**kw), _ctx(root))
        for name, kw in {
            "full": {},
            "prior": {"calibration": "prior"},
            "none": {"calibration": "none"},
            "oracle": {"calibration": "none", "routing": "oracle"},
        }.items()
    }
    return root, runs


def _fixed(table: pa.Table, column: str) -> np.ndarray:
    arr = table[column].combine_chunks()
    return arr.flatten().to_numpy().reshape(len(arr), -1)


def numpy_fusion(blocks, masks, ratios, a, b, prior, route=None):
    """Independent reference, one sample at a time: offset, affine, softmax per expert, drop
    open, scatter to global classes, renormalise; log-probabilities [N, C]."""
    n, c = blocks[0].shape[0], masks.shape[1]
    out = np.zeros((n, c))
    for i in range(n):
        p = np.zeros(c)
        start = 0
        for k, (z, mask, r) in enumerate(zip(blocks, masks, ratios, strict=True)):
            v = z[i].astype(np.float64).copy()
            if prior:
                v[-1] += math.log((1 + r) / 2)
            v = a[start : start + len(v)] * v + b[start : start + len(v)]
            start += len(v)
            e = np.exp(v - v.max())
            q = (e / e.sum())[:-1]
            w = 1.0 if route is None else float(route[i] == k)
            p[np.flatnonzero(mask)] = w * q
        with np.errstate(divide="ignore"):
            out[i] = np.log(p / p.sum())
    return out


def test_split_rule_and_thresholds():
    counts = np.array([100, 99, 20, 19, 0])
    assert in_split(counts, 100, None).tolist() == [True, False, False, False, False]
    assert in_split(counts, 20, 100).tolist() == [False, True, True, False, False]
    assert in_split(counts, 0, 20).tolist() == [False, False, False, True, True]
    assert splits_from_thresholds("20,100") == ((100, None), (20, 100), (0, 20))
    assert splits_from_thresholds("20") == ((20, None), (0, 20))
    with pytest.raises(ConfigError, match="distinct"):
        splits_from_thresholds("20,20")


def test_expert_view_open_draw_and_val():
    data = load_dataset(TINY)
    view = expert_view(data, 30, None, 4.0, seed=3)
    assert view.num_classes == 3 and view.class_names[-1] == "open"
    tr = view.train
    n_split = 48 + 30
    assert (tr.labels < 2).sum() == n_split and (tr.labels == 2).sum() == n_split // 4
    src = data.train.labels[np.searchsorted(data.train.source_index, tr.source_index)]
    assert set(src[tr.labels == 2]) <= {2, 3}  # open images come from the other classes only
    assert (src[tr.labels < 2] == tr.labels[tr.labels < 2]).all()  # re-indexed in class order
    again = expert_view(data, 30, None, 4.0, seed=3)
    assert np.array_equal(again.train.source_index, tr.source_index)  # drawn once, seeded
    other = expert_view(data, 30, None, 4.0, seed=4)
    assert not np.array_equal(other.train.source_index, tr.source_index)
    for split, per_class in ((view.val, 4), (view.test, 12)):  # in-split + an equal open set
        assert (split.labels < 2).sum() == 2 * per_class == (split.labels == 2).sum()
    few = expert_view(data, 0, 19, 100.0, seed=0)  # 12 images / 100 -> no open image
    assert few.num_classes == 2 and (few.train.labels == 1).sum() == 0


def test_num_learnable_freezes_top_down():
    def trainable(k):
        model = create_model("resnet8", 3)
        apply_num_learnable(model, k)
        return {n.split(".")[1] if n.startswith("backbone.") else "head"
                for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip

    assert trainable(1) == {"head"}
    assert trainable(2) == {"head", "layer3"}
    assert trainable(4) == {"head", "layer3", "layer2", "layer1"}
    assert trainable(-1) == {"head", "layer3", "layer2", "layer1", "conv1", "bn1"}
    with pytest.raises(ConfigError, match="use -1 or 1..4"):
        trainable(5)


def test_fusion_matches_numpy():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 7), dtype=bool)
    masks[0, [0, 3]] = masks[1, [1, 4, 6]] = masks[2, [2, 5]] = True
    ratios = np.array([16.0, 8.0, 2.0])
    layout = Layout(["expert0", "expert1", "expert2"], masks, ratios)
    blocks = [rng.normal(size=(5, w)).astype(np.float32) for w in layout.widths]
    route = rng.integers(0, 3, size=5)
    model = CalibrationModel(layout, "fused")
    a, b = rng.uniform(0.5, 2, model.dim), rng.normal(size=model.dim)
    with torch.no_grad():
        model.scale.copy_(torch.as_tensor(a)), model.bias.copy_(torch.as_tensor(b))
    for prior in (False, True):
        shifted = [z.copy() for z in blocks]
        if prior:
            for z, r in zip(shifted, ratios, strict=True):
                z[:, -1] += math.log((1 + r) / 2)
        x = torch.as_tensor(np.concatenate([*shifted, np.eye(3)[route]], 1), dtype=torch.float32)
        _, fused, oracle = model.heads(x)
        want = numpy_fusion(blocks, masks, ratios, a, b, prior)
        np.testing.assert_allclose(fused.detach().numpy(), want, atol=1e-5)
        want_oracle = numpy_fusion(blocks, masks, ratios, a, b, prior, route)
        got = oracle.detach().numpy()
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want_oracle))
        fin = np.isfinite(want_oracle)
        np.testing.assert_allclose(got[fin], want_oracle[fin], atol=1e-5)
    assert np.allclose(np.exp(want).sum(1), 1.0)


def test_pipeline_logits_tables(store):
    root, runs = store
    kinds = [o.spec.kind for o in runs["full"]]
    assert kinds == ["ce", "cbe_expert", "cbe_expert", "cbe_expert", "cbe_logits", "cbe_calibrate"]
    logits = runs["full"][4].artifact
    data = load_dataset(TINY)
    experts = logits.table("experts").to_pydict()
    assert experts["name"] == ["expert0", "expert1", "expert2"]
    assert experts["low"] == [30, 19, 0] and experts["high"] == [None, 30, 19]
    assert experts["class_mask"] == [
        [True, True, False, False], [False, False, True, False], [False, False, False, True]
    ]  # fmt: skip
    for split, n in (("val", 16), ("test", 48)):
        t = logits.table(split)
        assert t["index"].to_pylist() == list(range(n))
        assert t["label"].to_pylist() == getattr(data, split).labels.tolist()
        widths = [_fixed(t, f"expert{k}").shape[1] for k in range(3)]
        assert widths == [3, 2, 2] and _fixed(t, "logits").shape == (n, 4)
    # expert0's column is expert0's own model on the test images (raw logits)
    expert0 = runs["full"][1].artifact
    view = expert_view(data, 30, None, 4.0, seed=0)
    own = expert0.table("test")
    first = own["source_index"].to_numpy()[0]
    row = int(np.flatnonzero(data.test.source_index == first)[0])
    np.testing.assert_allclose(
        _fixed(logits.table("test"), "expert0")[row], _fixed(own, "logits")[0], atol=1e-4
    )
    assert len(view.test.labels) == own.num_rows
    assert (
        logits.metrics()["test"]["overall"]
        == runs["full"][0].artifact.metrics()["test"]["overall"]
    )  # the primary logits are the generalist's


def test_calibration_variants_match_numpy(store):
    root, runs = store
    logits = runs["full"][4].artifact
    test = logits.table("test")
    masks = np.asarray(logits.table("experts")["class_mask"].to_pylist())
    ratios = np.asarray(logits.table("experts")["open_ratio"].to_pylist())
    blocks = [_fixed(test, f"expert{k}") for k in range(3)]
    labels = test["label"].to_numpy()
    d = sum(b.shape[1] for b in blocks)
    ones = np.ones(d)
    route = masks.argmax(0)[labels]
    for name, prior, a, b, oracle in (
        ("none", False, ones, ones, False),
        ("prior", True, ones, ones, False),
        ("oracle", False, ones, ones, True),
    ):
        art = runs[name][-1].artifact
        want = numpy_fusion(blocks, masks, ratios, a, b, prior, route if oracle else None)
        got = _fixed(art.table("test"), "logits")
        assert (got.argmax(1) == want.argmax(1)).all(), name
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], atol=1e-4)
        acc = float((want.argmax(1) == labels).mean())
        assert art.metrics()["test"]["overall"] == pytest.approx(acc)
    full = runs["full"][-1].artifact
    state = full.state_dict()
    a, b = state["scale"].numpy(), state["bias"].numpy()
    assert not np.allclose(a, 1.0)  # trained on the val logits
    want = numpy_fusion(blocks, masks, ratios, a, b, True)
    np.testing.assert_allclose(_fixed(full.table("test"), "logits"), want, atol=1e-4)
    metrics = full.metrics()
    assert metrics["selected_epoch"] >= 1 and "oracle_overall" in metrics["test"]
    oracle_acc = runs["oracle"][-1].artifact.metrics()["test"]["overall"]
    assert runs["none"][-1].artifact.metrics()["test"]["oracle_overall"] == oracle_acc
    # the report's groups come from the real training counts, not the val rows
    groups = full.table("per_class")["train_count"].to_pylist()
    assert groups == [48, 30, 19, 12]


def test_early_stopping_exports_the_selected_epoch(store):
    root, runs = store
    generalist = runs["full"][0].spec
    from ray_lt.recipes.cbe import expert

    frozen = expert(
        generalist, 0, 19, 0, num_learnable=1,
        train=EXPERT.replace(epochs=8, lr=1e-9, patience=1, augment="none"),
    )  # fmt: skip
    art = run_pipeline(frozen, _ctx(root))[-1].artifact
    m = art.metrics()
    # a learning rate of 1e-9 changes nothing: epoch 1 stays best and patience 1 stops at 2
    assert m["selected_epoch"] == 1 and len(m["history"]) == 2


def test_reuse_one_expert_changed(store):
    root, runs = store
    outcomes = run_pipeline(tiny_cbe(open_ratio=(4.0, 4.0, 2.0)), _ctx(root))
    reused = {o.spec.name: o.reused for o in outcomes}
    assert reused == {
        "ce": True,
        "expert_30_inf": True,
        "expert_19_30": True,
        "expert_0_19": False,
        "logits": False,
        "calibrate_full_fused": False,
    }
    again = run_pipeline(tiny_cbe(calibration="prior"), _ctx(root))
    assert all(o.reused for o in again)
    assert (
        tiny_cbe().inputs[0][1].input_dict["generalist"].key
        == baseline("ce", 0, data=TINY, ce_train=tiny_ce(epochs=1).train, backbone="resnet8").key
    )  # the generalist is the CE baseline's stage


def _validate(spec: StageSpec) -> None:
    for stage in walk(spec):
        obj = get_objective(stage.kind)(stage)
        obj.validate(load_dataset(stage.data).class_counts)


def test_bad_inputs(store):
    root, runs = store
    with pytest.raises(ConfigError, match=r"no classes.*\[100, inf\)"):
        _validate(tiny_cbe(splits=((100, None), (19, 100), (0, 19))))
    with pytest.raises(ConfigError, match="no classes"):
        expert_view(load_dataset(TINY), 100, None, 4.0, 0)
    with pytest.raises(ConfigError, match="open_ratio must be > 0"):
        _validate(tiny_cbe(open_ratio=0.0))
    with pytest.raises(ConfigError, match="open_ratio must be > 0"):
        _validate(tiny_cbe(open_ratio=-2.0))
    with pytest.raises(ConfigError, match="leaves a gap"):
        _validate(tiny_cbe(splits=((30, None), (0, 19)), num_learnable=-1))
    with pytest.raises(ConfigError, match="overlaps"):
        _validate(tiny_cbe(splits=((30, None), (19, 40), (0, 19))))
    with pytest.raises(ConfigError, match="learns nothing"):
        _validate(dataclasses.replace(tiny_cbe(calibration="prior"), train=CALIB))
    with pytest.raises(ConfigError, match="calibration 'fuzzy' is unknown"):
        _validate(tiny_cbe(calibration="fuzzy"))
    # a calibration fed logits in another sample order stops before training, by name
    logits = runs["full"][4].artifact
    ups = upstream(__import__("ray_lt.artifacts").artifacts.ArtifactStore(str(root)),
                   {"logits": logits.key})  # fmt: skip
    test = ups["logits"].tables["test"]
    ups["logits"].tables["test"] = test.take(np.r_[1, 0, 2 : test.num_rows])
    spec = runs["full"][-1].spec
    obj = get_objective("cbe_calibrate")(spec)
    with pytest.raises(ConfigError, match=r"tables/test.parquet .* different samples .* row 0"):
        obj.prepare_data(load_dataset(TINY), ups)
    keys_before = sorted(__import__("os").listdir(root))
    assert keys_before  # nothing was removed from the store by the failures
