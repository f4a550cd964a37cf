"""SSD-LT and CBE fidelity options, on the real stage objects and recipes: the BatchNorm modes of
frozen networks (running statistics checked against the BatchNorm update rule by hand), CBE's
FC-512 and its num_learnable meaning, the many-shot boundary at exactly 100 images, and the
experts-without-open-class and extended-ensemble ablations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ray_lt.data.spec import DataSpec, LTDataset, Split, load_dataset
from ray_lt.engine.epoch import set_train_mode
from ray_lt.engine.evaluation import SplitOutputs, eval_metrics
from ray_lt.errors import ConfigError
from ray_lt.experiment import load_experiment
from ray_lt.metrics import shot_accuracy, shot_groups
from ray_lt.models import create_model
from ray_lt.models.resnet_tv import torchvision_backbone
from ray_lt.objective import Batch, StageContext, UpstreamArtifact, make_objective
from ray_lt.pipeline import TrialContext, run_pipeline
from ray_lt.recipes.cbe import cbe
from ray_lt.recipes.large import smoke_data, ssd_lt_large
from ray_lt.recipes.ssd_lt import ssd_lt
from ray_lt.spec import StageSpec, TrainSpec, walk
from ray_lt.stages.cbe import apply_num_learnable, expert_view
from ray_lt.stages.cbe_calibration import CalibrationModel, Layout
from tests.cli import ROOT
from tests.conftest import TINY, tiny_ce

MOMENTUM = 0.1  # torch's BatchNorm default: running = (1 - 0.1) * running + 0.1 * batch
TRAIN = TrainSpec(epochs=1, batch_size=32, lr=0.05, schedule="cosine", eval_every=1)
LWS_TRAIN = TRAIN.replace(sampler="class_aware", sampler_params={"k": 2})
EXPERT = TrainSpec(epochs=1, batch_size=32, lr=0.02, schedule="cosine", select="best", patience=5)
CALIB = TrainSpec(
    epochs=3, batch_size=256, lr=0.1, weight_decay=5e-4, augment="none", select="best",
    patience=5, schedule="step", milestones=(10,), gamma=0.1,
)  # fmt: skip
SPLITS = ((30, None), (19, 30), (0, 19))  # TINY's counts 48 30 19 12: 2 / 1 / 1 classes


# --- helpers: real stage objects on TINY, without a store -------------------------------------


def _ctx(spec: StageSpec, inputs: dict, data: LTDataset | None = None) -> StageContext:
    data = data or load_dataset(spec.data)
    counts = torch.as_tensor(data.class_counts)
    return StageContext(spec, data, torch.device("cpu"), inputs, counts)


def _artifact(spec: StageSpec, model: torch.nn.Module) -> UpstreamArtifact:
    """An upstream artifact of ``spec`` holding ``model``'s weights (what the store would give)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return UpstreamArtifact(key=spec.key, spec={"spec": spec.to_dict()}, state_dict=state)


def _batch(data: LTDataset, n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(0)
    raw = torch.from_numpy(data.train.images[:n].copy())
    x = (raw.float() / 255.0 - 0.5) / 0.25
    y = torch.from_numpy(data.train.labels[:n].copy())
    return Batch(x=x, y=y, index=torch.arange(n), raw=raw, generator=g)


def _expected_stats(bn: torch.nn.BatchNorm2d, inputs: torch.Tensor, moves: bool):
    """The running statistics after one forward of ``inputs`` through ``bn``, by the rule."""
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    if not moves:
        return old_mean, old_var
    mean = inputs.mean(dim=(0, 2, 3))
    var = inputs.var(dim=(0, 2, 3), unbiased=True)
    return (1 - MOMENTUM) * old_mean + MOMENTUM * mean, (1 - MOMENTUM) * old_var + MOMENTUM * var


def _one_step(objective, model: torch.nn.Module, batch: Batch, ctx: StageContext) -> None:
    """One SGD step as the engine takes it: its train mode, the objective's loss, the update."""
    set_train_mode(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    loss = sum(objective.loss(model, batch, ctx).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _assert_stats(bn: torch.nn.BatchNorm2d, want: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(bn.running_mean, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, want[1], rtol=1e-5, atol=1e-6)


def _ssd_stages(lws_bn: str, teacher_bn: str) -> dict[str, StageSpec]:
    final = ssd_lt(
        0, data=TINY, backbone="resnet8", queue_size=64, feature_train=TRAIN,
        lws_train=LWS_TRAIN, distill_train=TRAIN, lws_bn=lws_bn, teacher_bn=teacher_bn,
    )  # fmt: skip
    return {s.name: s for s in walk(final)}


# --- 1. BatchNorm modes of frozen networks -----------------------------------------------------


@pytest.mark.parametrize("bn, moves", [("frozen", False), ("batch", True)])
def test_ssd_stage2_bn_mode_follows_the_batchnorm_rule(bn, moves):
    stages = _ssd_stages(bn, "eval")
    feature, lws = stages["ssd_stage1"], stages["ssd_stage2"]
    data = load_dataset(TINY)
    stage1 = make_objective(feature).build(_ctx(feature, {}))
    objective = make_objective(lws)
    ctx = _ctx(lws, {"features": _artifact(feature, stage1)})
    model = objective.build(ctx)
    batch = _batch(data)
    bn1 = model.backbone.bn1
    with torch.no_grad():
        want = _expected_stats(bn1, model.backbone.conv1(batch.x), moves)
    _one_step(objective, model, batch, ctx)
    _assert_stats(bn1, want)
    assert model.backbone.bn1.training == moves  # batch statistics in the forward, or eval ones


@pytest.mark.parametrize("teacher_bn, moves", [("eval", False), ("train", True)])
def test_ssd_stage3_teacher_mode_follows_the_batchnorm_rule(teacher_bn, moves):
    stages = _ssd_stages("frozen", teacher_bn)
    feature, lws, distill = stages["ssd_stage1"], stages["ssd_stage2"], stages["ssd_stage3"]
    stage1 = make_objective(feature).build(_ctx(feature, {}))
    stage2 = make_objective(lws).build(_ctx(lws, {"features": _artifact(feature, stage1)}))
    objective = make_objective(distill)
    ctx = _ctx(distill, {"teacher": _artifact(lws, stage2)})
    model = objective.build(ctx)
    teacher = ctx.aux["teacher"]
    assert teacher.training == moves
    batch = _batch(ctx.data)
    with torch.no_grad():
        want = _expected_stats(teacher.backbone.bn1, teacher.backbone.conv1(batch.x), moves)
    _one_step(objective, model, batch, ctx)
    _assert_stats(teacher.backbone.bn1, want)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ssd_large_defaults_to_the_official_bn_and_keeps_the_frozen_row():
    def params(bn=None):
        config = {"seed": 0, "finetune": True}
        kwargs = {} if bn is None else {"bn": bn}
        final = ssd_lt_large(config, data=smoke_data("imagenet_lt"), backbone="resnet50", **kwargs)
        return {s.name: s.param_dict for s in walk(final)}

    official = params()
    assert official["ssd_stage2"] == official["ssd_finetune"] == {"bn": "batch"}
    assert official["ssd_stage3"]["teacher_bn"] == "train"
    frozen = params("frozen")
    assert frozen["ssd_stage2"] == frozen["ssd_finetune"] == {}  # the default: no key change
    assert "teacher_bn" not in frozen["ssd_stage3"]
    with pytest.raises(ConfigError, match="bn 'sync' is unknown"):
        params("sync")
    exp = load_experiment(ROOT / "experiments/ssd_lt_imagenet_lt.py")
    assert exp.param_space["bn"] == {"grid_search": ["official", "frozen"]}
    inat = load_experiment(ROOT / "experiments/ssd_lt_inat18.py")
    stages = walk(inat.pipeline({"seed": 0, "finetune": False}))
    assert {s.param_dict.get("teacher_bn") for s in stages if s.kind == "ssd_distill"} == {"train"}


def _cbe_expert(update_frozen_bn: bool, num_learnable: int = 1, **settings) -> StageSpec:
    final = cbe(
        0, splits=SPLITS, open_ratio=4.0, num_learnable=num_learnable, data=TINY,
        backbone="resnet8", generalist_train=tiny_ce(epochs=1).train, expert_train=EXPERT,
        calibration_train=CALIB, update_frozen_bn=update_frozen_bn, **settings,
    )  # fmt: skip
    return next(s for s in walk(final) if s.kind == "cbe_expert" and s.param_dict["low"] == 30)


def _built_expert(spec: StageSpec):
    generalist = spec.input_dict["generalist"]
    gen_model = make_objective(generalist).build(_ctx(generalist, {}))
    objective = make_objective(spec)
    view = objective.prepare_data(load_dataset(TINY), {})
    ctx = _ctx(spec, {"generalist": _artifact(generalist, gen_model)}, view)
    return objective, objective.build(ctx), ctx


@pytest.mark.parametrize("update, moves", [(False, False), (True, True)])
def test_cbe_frozen_expert_bn_follows_the_batchnorm_rule(update, moves):
    spec = _cbe_expert(update)
    assert spec.param_dict.get("update_frozen_bn", False) == update  # only when not the default
    objective, model, ctx = _built_expert(spec)
    assert not any(p.requires_grad for p in model.backbone.parameters())  # num_learnable 1
    batch = _batch(ctx.data)
    bn1 = model.backbone.bn1
    with torch.no_grad():
        want = _expected_stats(bn1, model.backbone.conv1(batch.x), moves)
    _one_step(objective, model, batch, ctx)
    _assert_stats(bn1, want)


def test_cbe_bn_option_stays_out_of_a_fully_trained_expert_key():
    assert _cbe_expert(True, num_learnable=-1).key == _cbe_expert(False, num_learnable=-1).key


# --- 2. CBE's FC-512 --------------------------------------------------------------------------


def test_fc512_is_linear_relu_to_512_and_loads_pretrained_weights_without_it(tmp_path):
    model = create_model("resnet50", 7, backbone_kwargs={"fc512": True})
    fc = model.backbone.fc
    assert [type(m).__name__ for m in fc] == ["Linear", "ReLU"]
    assert (fc[0].in_features, fc[0].out_features) == (2048, 512)
    assert model.feature_dim == 512 and model.head.in_features == 512
    features, logits = model.eval()(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512) and logits.shape == (2, 7) and (features >= 0).all()
    plain = create_model("resnet50", 7)
    assert plain.feature_dim == 2048 and not list(plain.backbone.fc.parameters())
    # an ImageNet-style file has no such layer: it loads, and the FC keeps its fresh init
    state = {k: v for k, v in torchvision_backbone("resnet10").state_dict().items()}
    save_file(state, str(tmp_path / "r10.safetensors"))
    loaded = torchvision_backbone(
        "resnet10", weights_path=str(tmp_path / "r10.safetensors"), fc512=True
    )
    assert torch.equal(loaded.conv1.weight, state["conv1.weight"])


def test_num_learnable_counts_the_fc_as_the_original_does():
    def trainable(k: int, fc512: bool) -> set[str]:
        model = create_model("resnet10", 3, backbone_kwargs={"fc512": fc512})
        apply_num_learnable(model, k)
        return {
            n.split(".")[1] if n.startswith("backbone.") else "head"
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    assert trainable(1, True) == {"head"}
    assert trainable(2, True) == {"head", "fc"}  # classifier + the 512-d FC
    assert trainable(3, True) == {"head", "fc", "layer4"}  # ImageNet-LT's medium expert
    assert trainable(6, True) == {"head", "fc", "layer4", "layer3", "layer2", "layer1"}
    assert "conv1" in trainable(-1, True)
    with pytest.raises(ConfigError, match=r"4 stages \+ FC \+ classifier; use -1 or 1..6"):
        trainable(7, True)
    assert trainable(2, False) == {"head", "layer4"}  # without the FC: k - 1 stages
    with pytest.raises(ConfigError, match="use -1 or 1..5"):
        trainable(6, False)


def test_cbe_scale_files_use_fc512_and_the_official_num_learnable():
    exp = load_experiment(ROOT / "experiments/cbe_imagenet_lt.py")
    stages = walk(exp.pipeline({"seed": 5021, "calibration": "full"}))
    (generalist,) = [s for s in stages if s.kind == "ce"]
    assert generalist.param_dict["backbone_kwargs"] == {"fc512": True}
    experts = sorted(
        (s for s in stages if s.kind == "cbe_expert"), key=lambda s: -s.param_dict["low"]
    )
    assert [e.param_dict["num_learnable"] for e in experts] == [-1, 3, 1]
    assert [e.param_dict.get("update_frozen_bn", False) for e in experts] == [False, True, True]
    frozen = walk(exp.pipeline({"seed": 5021, "calibration": "full", "bn": "frozen"}))
    assert not any("update_frozen_bn" in s.param_dict for s in frozen)
    assert exp.param_space["bn"] == {"grid_search": ["official", "frozen"]}
    assert {s.data.many_inclusive for s in stages} == {True}


# --- 3. the many-shot boundary ----------------------------------------------------------------


def test_many_boundary_at_exactly_100_by_hand():
    counts = np.array([101, 100, 99, 20, 19])
    assert shot_groups(counts).tolist() == [0, 1, 1, 1, 2]  # many > 100
    assert shot_groups(counts, many_inclusive=True).tolist() == [0, 0, 1, 1, 2]  # many >= 100
    # class 0 right twice, class 1 right once of two, class 2 wrong, 3 right, 4 wrong
    labels = np.array([0, 0, 1, 1, 2, 3, 4])
    preds = np.array([0, 0, 1, 0, 0, 3, 0])
    usual = shot_accuracy(preds, labels, counts)
    assert usual["many"] == 1.0 and usual["medium"] == pytest.approx((0.5 + 0 + 1) / 3)
    cbe_rule = shot_accuracy(preds, labels, counts, many_inclusive=True)
    assert cbe_rule["many"] == pytest.approx((1 + 0.5) / 2) and cbe_rule["medium"] == 0.5
    assert usual["few"] == cbe_rule["few"] == 0.0
    assert usual["overall"] == cbe_rule["overall"] == pytest.approx(4 / 7)


def _hand_dataset(many_inclusive: bool) -> LTDataset:
    """Train counts 100 / 30 / 5; test: two images per class."""
    train = np.repeat([0, 1, 2], [100, 30, 5]).astype(np.int64)
    test = np.repeat([0, 1, 2], 2).astype(np.int64)

    def split(labels: np.ndarray) -> Split:
        images = np.zeros((len(labels), 3, 4, 4), dtype=np.uint8)
        return Split(images, labels, np.arange(len(labels), dtype=np.int64))

    return LTDataset(
        "hand", 3, ["a", "b", "c"], split(train), split(test[:0]), split(test),
        (0.5,) * 3, (0.25,) * 3, many_inclusive=many_inclusive,
    )  # fmt: skip


def test_stage_metrics_follow_the_dataset_rule():
    # test predictions: class 0 both right, class 1 one right, class 2 none
    logits = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]])
    out = {"test": SplitOutputs(logits, torch.zeros(6, 1))}
    usual = eval_metrics(out, _hand_dataset(False))
    assert math.isnan(usual["many"]) and usual["medium"] == pytest.approx(0.75)
    cbe_rule = eval_metrics(out, _hand_dataset(True))
    assert cbe_rule["many"] == 1.0 and cbe_rule["medium"] == 0.5 and cbe_rule["few"] == 0.0


def test_many_inclusive_reaches_the_dataset_and_keeps_old_keys():
    spec = TINY
    assert "many_inclusive" not in spec.to_dict()  # the default: every existing key stays
    inclusive = dataclasses.replace(spec, many_inclusive=True)
    assert inclusive.to_dict()["many_inclusive"] is True
    assert DataSpec.from_dict(inclusive.to_dict()) == inclusive
    assert load_dataset(inclusive).many_inclusive and not load_dataset(spec).many_inclusive
    with pytest.raises(ConfigError, match="many_inclusive must be True or False"):
        DataSpec(many_inclusive=1)
    places = load_experiment(ROOT / "experiments/cbe_places_lt.py", smoke=True)
    assert places.name == "cbe_places_lt-smoke"


# --- 4. CBE ablations: no open class, extended ensemble ---------------------------------------


def test_expert_without_open_class_has_only_its_classes():
    data = load_dataset(TINY)
    view = expert_view(data, 30, None, 4.0, seed=0, open_class=False)
    assert view.num_classes == 2 and "open" not in view.class_names
    assert len(view.train.labels) == 48 + 30 and set(view.train.labels.tolist()) == {0, 1}
    assert len(view.val.labels) == 2 * 4 and len(view.test.labels) == 2 * 12  # no open half
    spec = _cbe_expert(False, open_class=False)
    assert spec.param_dict == {"low": 30, "high": None, "num_learnable": 1, "open_class": False}
    objective, model, ctx = _built_expert(spec)
    assert model.head.out_features == 2 == ctx.num_classes
    batch = _batch(ctx.data)
    assert int(batch.y.max()) < 2  # no open target in the loss
    _, logits = model(batch.x)
    want = F.cross_entropy(logits, batch.y)
    torch.testing.assert_close(objective.loss(model, batch, ctx)["ce"], want)


def _layout(open_class) -> Layout:
    masks = np.zeros((2, 5), dtype=bool)
    masks[0, [0, 2]] = masks[1, [1, 3, 4]] = True
    return Layout(["expert0", "expert1"], masks, np.array([16.0, 8.0]), np.array(open_class))


def test_extended_ensemble_calibrates_the_generalist_as_one_more_member():
    layout = _layout([True, False])
    assert layout.widths == [3, 3]  # expert1 has no open slot
    plain = CalibrationModel(layout, "fused")
    extended = CalibrationModel(layout, "fused", generalist=True)
    assert plain.scale.numel() == 6 and extended.scale.numel() == 6 + 5
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 11)).astype(np.float32)
    route = np.eye(2, dtype=np.float32)[[0, 1, 1, 0]]
    x = torch.as_tensor(np.concatenate([z, route], 1))
    with torch.no_grad():
        extended.scale.copy_(torch.as_tensor(rng.uniform(0.5, 2, 11)))
        _, fused, oracle = extended.heads(x)
        zc = z * extended.scale.numpy() + extended.bias.numpy()
    # by hand: expert0 softmax over 3 (drop open), expert1 softmax over 3, times generalist
    p = np.zeros((4, 5))
    e0 = np.exp(zc[:, 0:3]) / np.exp(zc[:, 0:3]).sum(1, keepdims=True)
    e1 = np.exp(zc[:, 3:6]) / np.exp(zc[:, 3:6]).sum(1, keepdims=True)
    p[:, [0, 2]], p[:, [1, 3, 4]] = e0[:, :2], e1
    g = np.exp(zc[:, 6:]) / np.exp(zc[:, 6:]).sum(1, keepdims=True)
    want = np.log(p * g / (p * g).sum(1, keepdims=True))
    np.testing.assert_allclose(fused.numpy(), want, atol=1e-5)
    routed = p * route[:, [0, 1, 0, 1, 1]]  # the oracle stays experts-only
    with np.errstate(divide="ignore"):
        want_oracle = np.log(routed / routed.sum(1, keepdims=True))
    np.testing.assert_allclose(oracle.numpy(), want_oracle, atol=1e-5)


def test_ablation_pipeline_runs_on_tiny_data(tmp_path):
    final = cbe(
        0, splits=SPLITS, open_ratio=4.0, num_learnable=(-1, 2, 1), data=TINY,
        backbone="resnet8", generalist_train=tiny_ce(epochs=1).train, expert_train=EXPERT,
        calibration_train=CALIB, open_class=False, include_generalist=True,
    )  # fmt: skip
    assert final.param_dict["include_generalist"] is True
    outcomes = run_pipeline(final, TrialContext(store_uri=str(tmp_path), in_process="cpu"))
    logits, calibrate = outcomes[-2].artifact, outcomes[-1].artifact
    assert logits.table("experts")["open_class"].to_pylist() == [False] * 3
    assert len(logits.table("test")["expert0"][0]) == 2  # two classes, no open slot
    assert calibrate.state_dict()["scale"].numel() == (2 + 1 + 1) + TINY.num_classes
    assert 0.0 <= calibrate.metrics()["test"]["overall"] <= 1.0


def test_ablations_experiment_rows():
    exp = load_experiment(ROOT / "experiments/cbe_ablations.py")
    assert exp.seeds == (1, 2, 3) and exp.baseline == {"row": "experts+calibration"}
    rows = exp.param_space["row"]["grid_search"]

    def stages(row: str) -> list[StageSpec]:
        return walk(exp.pipeline({"row": row, "seed": 1}))

    reference = {s.key for s in stages("experts+calibration")}
    no_open = [s for s in stages("no open class") if s.kind == "cbe_expert"]
    assert all(s.param_dict["open_class"] is False for s in no_open)
    extended = stages("extended ensemble")
    assert extended[-1].param_dict["include_generalist"] is True
    assert {s.key for s in extended[:-1]} <= reference  # only the calibration is new
    bn = [s for s in stages("frozen BN re-estimated") if s.kind == "cbe_expert"]
    assert sum("update_frozen_bn" in s.param_dict for s in bn) == 2  # medium and few
    assert stages("generalist")[-1].kind == "ce" and len(rows) == 6
    smoke = load_experiment(ROOT / "experiments/cbe_ablations.py", smoke=True)
    for row in smoke.param_space["row"]["grid_search"]:
        assert smoke.pipeline({"row": row, "seed": 0}).data.name == "synthetic_lt"
