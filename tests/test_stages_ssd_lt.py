"""Tests for ray_lt.stages.ssd_lt (SSD-LT stages I and III), the ``moco_v2`` augmentation, the
``lws`` BatchNorm option and the SSD-LT pipeline's artifact reuse.

Losses are checked against independent formulas on tiny tensors; the end-to-end tests train real
ResNet-8 stages on ``synthetic_lt`` in-process through the real pipeline and artifact store.
"""

from __future__ import annotations

import math

import pytest
import torch

from ray_lt.data import augment_batch, load_dataset
from ray_lt.data.augment import MOCO_SCALE, resized_crop_boxes, second_view_images
from ray_lt.engine import LocalSession, StageRun, run_stage
from ray_lt.errors import ConfigError
from ray_lt.objective import Batch, StageContext, UpstreamArtifact, get_objective, parse_params
from ray_lt.pipeline import TrialContext, run_pipeline
from ray_lt.recipes.ssd_lt import ssd_lt
from ray_lt.spec import StageSpec, TrainSpec
from ray_lt.stages.ssd_lt import SSDFeatureModel, contrastive_loss, kd_loss
from tests.conftest import TINY

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
TRAIN = TrainSpec(epochs=1, batch_size=32, lr=0.05, schedule="cosine", eval_every=1)
LWS_TRAIN = TRAIN.replace(sampler="class_aware", sampler_params={"k": 2})
N_TRAIN = 109  # TINY: 48 + 30 + 19 + 12


def _images(b: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _feature_spec(**params) -> StageSpec:
    p = {"backbone": "resnet8", "queue_size": 64, **params}
    return StageSpec(kind="ssd_feature", data=TINY, train=TRAIN, params=p)


def _ctx(spec: StageSpec, inputs=None) -> StageContext:
    data = load_dataset(spec.data)
    return StageContext(
        spec=spec,
        data=data,
        device=torch.device("cpu"),
        inputs=inputs or {},
        class_counts=torch.as_tensor(data.class_counts),
    )


def _batch(data, n: int = 8, seed: int = 0) -> Batch:
    raw = torch.from_numpy(data.train.images[:n].copy())
    gen = _gen(seed)
    x = augment_batch("crop_flip", raw, gen, data.mean, data.std)
    y = torch.from_numpy(data.train.labels[:n].copy())
    view2 = second_view_images(raw, gen, MOCO_SCALE)  # as the engine draws it on the device
    return Batch(x=x, y=y, index=torch.arange(n), raw=raw, generator=gen, view2=view2)


# --- moco_v2 -----------------------------------------------------------------------------------


def test_moco_v2_shape_range_determinism():
    x = _images(32, 32)
    a = augment_batch("moco_v2", x, _gen(3), ZERO, ONE)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, augment_batch("moco_v2", x, _gen(3), ZERO, ONE))
    assert not torch.equal(a, augment_batch("moco_v2", x, _gen(4), ZERO, ONE))
    blurred = augment_batch("moco_v2_blur", x, _gen(3), ZERO, ONE)
    assert blurred.shape == x.shape and not torch.equal(blurred, a)


def test_moco_v2_greys_about_a_fifth():
    out = augment_batch("moco_v2", _images(2000, 8), _gen(1), ZERO, ONE)
    grey = ((out[:, 0] == out[:, 1]) & (out[:, 1] == out[:, 2])).flatten(1).all(1)
    assert 0.16 < grey.float().mean().item() < 0.24


def test_resized_crop_boxes_scale_ratio_and_bounds():
    boxes = resized_crop_boxes(20_000, 32, 32, _gen(2))
    top, left, h, w = boxes.unbind(1)
    area = h * w / 1024
    # rounding to whole pixels widens the nominal [0.2, 1] range a little
    assert area.min() >= 0.17 and area.max() <= 1.0
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.43
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    assert 0.5 < area.mean() < 0.7  # about uniform on [0.2, 1] (mean 0.6)


def test_full_box_without_flip_is_the_identity():
    from ray_lt.data.augment import _resized_crop_flip

    x = torch.rand(64, 3, 8, 8)
    gen = _gen(0)
    out = _resized_crop_flip(x, gen)
    gen = _gen(0)
    boxes = resized_crop_boxes(64, 8, 8, gen)
    flip = torch.rand(64, generator=gen) < 0.5
    full = (boxes[:, 2] == 8) & (boxes[:, 3] == 8)
    assert full.any()
    for i in torch.nonzero(full).flatten().tolist():
        expected = x[i].flip(-1) if flip[i] else x[i]
        assert torch.allclose(out[i], expected, atol=1e-5)


# --- stage I: loss, EMA, queue, queue validation ----------------------------------------------


def _reference_moco(q, k, queue, qlabels, y, tau, mask):
    losses = []
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        negs = [
            math.exp(float(q[i] @ queue[j]) / tau)
            for j in range(len(queue))
            if not (mask and int(qlabels[j]) == int(y[i]))
        ]
        losses.append(-math.log(pos / (pos + sum(negs))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("mask", (True, False))
def test_contrastive_loss_matches_formula_with_label_mask(mask):
    g = _gen(0)
    q = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    qlabels = torch.tensor([0, 1, 1, 2, 3, 0])
    y = torch.tensor([0, 1, 2, 3])
    got = contrastive_loss(q, k, queue, qlabels, y, temperature=0.2, mask_labels=mask)
    assert got.item() == pytest.approx(_reference_moco(q, k, queue, qlabels, y, 0.2, mask), 1e-5)
    other = contrastive_loss(q, k, queue, qlabels, y, temperature=0.2, mask_labels=not mask)
    assert got.item() != pytest.approx(other.item(), 1e-4)  # the mask matters here


def _feature_model(queue: int = 8) -> SSDFeatureModel:
    from ray_lt.models import create_model

    torch.manual_seed(0)
    backbone = create_model("resnet8", 4).backbone
    return SSDFeatureModel(backbone, 4, hidden_dim=16, embed_dim=8, queue_size=queue)


def test_ema_update_and_frozen_key_encoder():
    model = _feature_model()
    assert all(not p.requires_grad for p in model.key_backbone.parameters())
    assert all(not p.requires_grad for p in model.key_projection.parameters())
    assert model.key_backbone.update_batch_stats and model.key_projection.update_batch_stats
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.projection.parameters()]:
            p.add_(1.0)
    before = [p.clone() for p in model.key_projection.parameters()]
    query = [p.clone() for p in model.projection.parameters()]
    model.momentum_update(0.9)
    for k, k0, q in zip(model.key_projection.parameters(), before, query, strict=True):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q, atol=1e-6)
    names = {n for n, _ in model.named_buffers()}
    assert {"queue", "queue_labels", "queue_ptr"} <= names
    assert {"queue", "queue_labels", "queue_ptr"} <= set(model.state_dict())


def test_queue_enqueue_wraps_and_keeps_labels():
    model = _feature_model(queue=8)
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(8))
    assert (model.queue_labels == 0).all()
    keys = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    model.enqueue(keys, torch.arange(6))
    assert int(model.queue_ptr) == 6 and torch.equal(model.queue[:6], keys)
    model.enqueue(keys[:4], torch.tensor([10, 11, 12, 13]))  # 2 at the end, 2 wrap to the front
    assert int(model.queue_ptr) == 2
    assert model.queue_labels.tolist() == [12, 13, 2, 3, 4, 5, 10, 11]
    assert torch.equal(model.queue[6:], keys[:2]) and torch.equal(model.queue[:2], keys[2:4])


def test_loss_terms_update_momentum_and_enqueue():
    spec = _feature_spec(ssl_weight=0.5)
    ctx = _ctx(spec)
    objective = get_objective("ssd_feature")(spec)
    params = parse_params(objective, spec)
    model = objective.build(ctx)
    model.train()
    key0 = next(model.key_backbone.parameters()).clone()
    batch = _batch(ctx.data)
    terms = objective.loss(model, batch, ctx)
    assert set(terms) == {"ce", "ssl"}
    assert int(model.queue_ptr) == 8 and torch.equal(model.queue_labels[:8], batch.y)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.projection.parameters())
    assert all(p.grad is None for p in model.key_backbone.parameters())
    # keys were computed after the EMA step (query == key at init, so the step changes nothing
    # yet); after an optimiser-like change the next call moves the key encoder by (1 - m)
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1.0)
    objective.loss(model, _batch(ctx.data, seed=1), ctx)
    moved = next(model.key_backbone.parameters()) - key0
    assert torch.allclose(moved, torch.full_like(moved, 1.0 - params.momentum), atol=1e-6)


def test_lambda_zero_has_no_ssl_term_and_no_queue():
    spec = _feature_spec(ssl_weight=0.0)
    ctx = _ctx(spec)
    objective = get_objective("ssd_feature")(spec)
    model = objective.build(ctx)
    assert set(objective.loss(model, _batch(ctx.data), ctx)) == {"ce"}
    assert not any(k.startswith(("queue", "key_", "projection")) for k in model.state_dict())


@pytest.mark.parametrize(
    "queue, match",
    [(100, "not a multiple of the batch size 32; use e.g. 96"), (128, "exceeds the 109")],
)
def test_bad_queue_is_rejected_on_the_driver_and_at_build(queue, match):
    spec = _feature_spec(queue_size=queue)
    objective = get_objective("ssd_feature")(spec)
    with pytest.raises(ConfigError, match=match):
        objective.validate(load_dataset(spec.data).class_counts)
    with pytest.raises(ConfigError, match=match):
        objective.build(_ctx(spec))


def test_default_queue_is_the_largest_whole_batch_count():
    spec = _feature_spec(queue_size=None)
    objective = get_objective("ssd_feature")(spec)
    objective.validate(load_dataset(spec.data).class_counts)
    assert int(load_dataset(TINY).class_counts.sum()) == N_TRAIN
    assert len(objective.build(_ctx(spec)).queue) == 96
    from ray_lt.recipes import CIFAR100_LT_100

    assert int(load_dataset(CIFAR100_LT_100).class_counts.sum()) == 10_847


# --- stage III: KD, heads, teacher ------------------------------------------------------------


def test_kd_loss_matches_t2_kl_summed_over_classes():
    g = _gen(0)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    T = 2.0
    expected = 0.0
    for i in range(3):
        p = torch.softmax(t[i] / T, 0)
        q = torch.softmax(s[i] / T, 0)
        expected += float((p * (p / q).log()).sum())
    expected = T * T * expected / 3
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_validation_names_the_fix():
    objective = get_objective("ssd_distill")
    bad = StageSpec(
        kind="ssd_distill",
        data=TINY,
        train=TRAIN,
        params={"backbone": "resnet8"},
        inputs={"features": _feature_spec()},
    )
    with pytest.raises(ConfigError, match="one input named 'teacher'"):
        objective(bad).validate(load_dataset(TINY).class_counts)
    none = StageSpec(kind="ssd_distill", data=TINY, train=TRAIN, params={"backbone": "resnet8"})
    with pytest.raises(ConfigError, match="set kd_weight=0"):
        objective(none).validate(load_dataset(TINY).class_counts)
    odd = StageSpec(kind="ssd_distill", data=TINY, train=TRAIN, params={"teacher_bn": "x"})
    with pytest.raises(ConfigError, match="teacher_bn 'x' is unknown"):
        parse_params(objective, odd)


# --- end to end: stage I -> LWS -> stage III -> LWS fine-tune ---------------------------------


def _pipeline(**options) -> StageSpec:
    return ssd_lt(
        0,
        data=TINY,
        backbone="resnet8",
        queue_size=64,
        feature_train=TRAIN,
        lws_train=LWS_TRAIN,
        distill_train=TRAIN,
        **options,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("ssd_store")


@pytest.fixture(scope="module")
def finetuned(store):
    return run_pipeline(
        _pipeline(finetune=True), TrialContext(store_uri=str(store), in_process="cpu")
    )


def test_pipeline_exports_both_heads_and_reuses_on_finetune_change(finetuned, store):
    kinds = [o.spec.kind for o in finetuned]
    assert kinds == ["ssd_feature", "lws", "ssd_distill", "lws"]
    assert not any(o.reused for o in finetuned)
    distill = finetuned[2].artifact
    metrics = distill.metrics()["test"]
    assert {"soft_overall", "soft_many", "overall"} <= set(metrics)
    test = distill.table("test")
    assert "logits_soft" in test.column_names
    assert len(test.column("logits_soft")[0]) == TINY.num_classes
    assert "accuracy_soft" in distill.table("per_class").column_names
    # the fine-tune (LWS on the hard head) is the only stage rerun when only its settings change
    again = run_pipeline(
        _pipeline(finetune=True, finetune_train=LWS_TRAIN.replace(lr=0.02)),
        TrialContext(store_uri=str(store), in_process="cpu"),
    )
    assert [o.reused for o in again] == [True, True, True, False]
    assert again[-1].artifact.key != finetuned[-1].artifact.key


def test_teacher_is_frozen_and_finetune_uses_the_hard_head(finetuned):
    teacher = finetuned[1].artifact.state_dict()
    distill = finetuned[2].artifact.state_dict()
    finetune = finetuned[3].artifact.state_dict()
    # the fine-tune's frozen encoder and W, b are the stage-III hard head's, not the soft head's
    assert torch.equal(finetune["head.linear.weight"], distill["head.weight"])
    assert not torch.equal(finetune["head.linear.weight"], distill["soft_head.weight"])
    assert not any(k.startswith("soft_head") for k in finetune)
    assert "head.scale" in teacher and not any(k.startswith("teacher") for k in distill)


def test_distill_run_leaves_the_teacher_unchanged(finetuned, tmp_path):
    lws_art = finetuned[1].artifact
    spec = finetuned[2].spec
    before = {k: v.clone() for k, v in lws_art.state_dict().items()}
    up = UpstreamArtifact(key=lws_art.key, spec=lws_art.spec(), state_dict=lws_art.state_dict())
    seen = {}

    class Observed(get_objective("ssd_distill")):
        def build(self, ctx):  # keep a handle on the teacher the stage builds into ctx.aux
            model = super().build(ctx)
            seen["teacher"] = ctx.aux["teacher"]
            return model

    objective = Observed  # a subclass: the registered class stays as it is
    run = StageRun(spec, objective, load_dataset(TINY), {"teacher": up}, str(tmp_path / "o"))
    run_stage(run, LocalSession("cpu"))
    teacher = seen["teacher"]
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bn, moves", [("frozen", False), ("batch", True)])
def test_lws_bn_option(finetuned, bn, moves, tmp_path):
    feature = finetuned[0].artifact
    up = UpstreamArtifact(key=feature.key, spec=feature.spec(), state_dict=feature.state_dict())
    spec = StageSpec(
        kind="lws",
        data=TINY,
        train=LWS_TRAIN,
        params={} if bn == "frozen" else {"bn": bn},
        inputs={"features": finetuned[0].spec},
    )
    run = StageRun(spec, get_objective("lws"), load_dataset(TINY), {"features": up}, str(tmp_path))
    run_stage(run, LocalSession("cpu"))
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "model.safetensors"))
    name = next(k for k in out if k.endswith("running_mean"))
    assert torch.equal(out[name], up.state_dict[name]) != moves
    if bn == "frozen":  # the default adds nothing to the params, so old lws keys stay
        assert spec.params == () and parse_params(get_objective("lws"), spec).bn == "frozen"
