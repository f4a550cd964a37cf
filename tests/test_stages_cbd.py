"""Tests for ray_lt.stages.cbd (CBD teachers, student) and its ``crop_flip_simclr`` augmentation.

The end-to-end tests train real tiny teachers and students in-process through the real pipeline
and artifact store (ResNet-8 on ``synthetic_lt``), then read the stored artifacts back.
"""

from __future__ import annotations

import colorsys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ray_lt.artifacts import ArtifactStore
from ray_lt.data import augment_batch, load_dataset
from ray_lt.data.augment import GREY_WEIGHTS, colour_distort, hsv_to_rgb, rgb_to_hsv
from ray_lt.engine import LocalSession, StageRun, run_stage
from ray_lt.errors import ConfigError
from ray_lt.models import create_model
from ray_lt.objective import Batch, StageContext, UpstreamArtifact, get_objective, parse_params
from ray_lt.pipeline import TrialContext, run_pipeline, upstream
from ray_lt.spec import StageSpec
from ray_lt.stages.cbd import CBDStudent, CBDStudentModel, teacher_target
from tests.conftest import TINY, tiny_ce

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean / std that keep pixels in [0, 1]


def _images(b: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _is_grey(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1)


# --- crop_flip_simclr --------------------------------------------------------------------------


def test_simclr_shape_range_and_determinism():
    x = _images(64, 32)
    a = augment_batch("crop_flip_simclr", x, _gen(3), ZERO, ONE)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.equal(a, augment_batch("crop_flip_simclr", x, _gen(3), ZERO, ONE))
    assert not torch.equal(a, augment_batch("crop_flip_simclr", x, _gen(4), ZERO, ONE))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    b = augment_batch("crop_flip_simclr", x, _gen(3), mean, std)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(b, (a - m) / s, atol=1e-5)  # normalised after the colour ops


def test_simclr_greys_about_a_fifth_of_the_images():
    out = augment_batch("crop_flip_simclr", _images(4000), _gen(1), ZERO, ONE)
    rate = _is_grey(out).float().mean().item()
    assert 0.17 < rate < 0.23, rate  # p = 0.2; binomial sd 0.006


def test_jitter_leaves_about_a_fifth_untouched_without_greyscale():
    x = _images(4000).float() / 255.0
    out = colour_distort(x, _gen(2), p_grey=0.0)
    same = (out == x).flatten(1).all(1).float().mean().item()
    assert 0.17 < same < 0.23, same  # p_jitter = 0.8
    assert not _is_grey(out).any()  # saturation never drops below 0.2: jitter alone never greys


def test_greyscale_uses_tf_weights_and_strength_zero_is_identity():
    x = _images(16).float() / 255.0
    grey = colour_distort(x, _gen(), p_jitter=0.0, p_grey=1.0)
    expected = (x * torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(grey, expected.expand_as(x), atol=1e-6)
    # strength 0: every factor is 1 and every hue shift 0, so only HSV rounding remains
    assert torch.allclose(colour_distort(x, _gen(), strength=0.0, p_grey=0.0), x, atol=1e-5)


def test_jitter_changes_colours_per_image():
    x = _images(256).float() / 255.0
    out = colour_distort(x, _gen(5), p_jitter=1.0, p_grey=0.0)
    changed = (out - x).abs().flatten(1).amax(1)
    assert (changed > 1e-3).float().mean() > 0.95
    # per-image draws: the mean brightness ratio varies across images
    ratio = out.mean((1, 2, 3)) / x.mean((1, 2, 3))
    assert ratio.std() > 0.1


def test_hsv_matches_colorsys_and_round_trips():
    x = torch.rand(2, 3, 5, 5, generator=_gen(6))
    x[0, :, 0, 0] = 0.5  # grey pixel: hue and saturation 0
    x[0, :, 0, 1] = 0.0  # black pixel
    hsv = rgb_to_hsv(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    ref = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels])
    assert torch.allclose(hsv.permute(0, 2, 3, 1).reshape(-1, 3), ref, atol=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    shifted = rgb_to_hsv(red) + torch.tensor([1 / 3, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(hsv_to_rgb(shifted).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_simclr_on_cuda_matches_cpu():
    x = _images(32, 32)
    cpu = augment_batch("crop_flip_simclr", x, _gen(9), ZERO, ONE)
    gpu = augment_batch("crop_flip_simclr", x.cuda(), _gen(9), ZERO, ONE)  # CPU generator
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-4)


# --- objectives on a hand-built context ---------------------------------------------------------


def _teacher(augment: str = "vanilla", seed: int = 1, epochs: int = 1) -> StageSpec:
    return StageSpec(
        kind="cbd_teacher",
        data=TINY,
        train=tiny_ce(epochs=epochs, seed=seed, eval_every=99).train,
        params={"backbone": "resnet8", "augment": augment},
    )


def _student(inputs: dict[str, StageSpec], epochs: int = 1, **params: object) -> StageSpec:
    train = tiny_ce(epochs=epochs, seed=3, sampler="class_balanced", eval_every=99).train
    return StageSpec(
        kind="cbd_student",
        data=TINY,
        train=train,
        params={"backbone": "resnet8", **params},
        inputs=inputs,
    )


def _artifact(backbone: str = "resnet8", seed: int = 0) -> UpstreamArtifact:
    spec = StageSpec(kind="ce", data=TINY, train=tiny_ce().train, params={"backbone": backbone})
    torch.manual_seed(seed)
    model = create_model(backbone, TINY.num_classes)
    doc = {"key": spec.key, "spec": spec.to_dict()}
    return UpstreamArtifact(key=spec.key, spec=doc, state_dict=model.state_dict())


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY)


def _ctx(spec: StageSpec, data, inputs: dict[str, UpstreamArtifact]) -> StageContext:
    return StageContext(
        spec=spec,
        data=data,
        device=torch.device("cpu"),
        inputs=inputs,
        class_counts=torch.as_tensor(data.class_counts),
    )


def _build(spec: StageSpec, data, inputs: dict[str, UpstreamArtifact]):
    objective = get_objective(spec.kind)(spec)
    params = parse_params(objective, spec)
    ctx = _ctx(spec, data, inputs)
    return objective, params, ctx, objective.build(ctx)


def _batch(data, n: int = 16, seed: int = 0) -> Batch:
    gen = _gen(seed)
    raw = torch.from_numpy(data.train.images[:n].copy())
    x = augment_batch("crop_flip", raw, gen, data.mean, data.std)
    y = torch.from_numpy(data.train.labels[:n].copy())
    return Batch(x=x, y=y, index=torch.arange(n), raw=raw, generator=gen)


def test_teacher_has_a_fixed_cosine_head_and_data_aug_distorts_the_engine_view(data):
    objective, params, ctx, model = _build(_teacher("data_aug"), data, {})
    assert type(model.head).__name__ == "CosineHead"
    assert not any(p is model.head.scale for p in model.parameters())  # fixed, not learnt
    batch = _batch(data)
    state = batch.generator.get_state()
    terms = objective.loss(model, batch, ctx)
    assert set(terms) == {"ce"}
    m, s = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    images = (batch.x * s + m).clamp(0.0, 1.0)  # the engine's crop, back in [0, 1]
    expected_x = (colour_distort(images, _gen().set_state(state)) - m) / s
    model.eval()  # same BN statistics for both forwards
    with torch.no_grad():
        again = objective.loss(model, _replay(batch, state), ctx)["ce"]
        direct = F.cross_entropy(model(expected_x)[1], batch.y)
        vanilla = F.cross_entropy(model(batch.x)[1], batch.y)
    assert torch.allclose(again, direct, atol=1e-5) and not torch.allclose(direct, vanilla)


def _replay(batch: Batch, state: torch.Tensor) -> Batch:
    return Batch(batch.x, batch.y, batch.index, batch.raw, _gen().set_state(state))


def test_student_loss_terms_are_the_cbd_formula(data):
    inputs = {"teacher0": _artifact(seed=1), "teacher1": _artifact(seed=2)}
    spec = _student({"teacher0": tiny_ce(), "teacher1": tiny_ce(seed=1)}, alpha=0.3, beta=50.0)
    objective, params, ctx, model = _build(spec, data, inputs)
    assert params.proj_dim is None and model.feature_dim == 128  # 2 teachers x 64
    teachers = ctx.aux["teachers"]
    assert list(teachers) == ["teacher0", "teacher1"]
    assert all(not t.training for t in teachers.values())
    assert all(not p.requires_grad for t in teachers.values() for p in t.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())
    batch = _batch(data)
    model.eval()
    terms = objective.loss(model, batch, ctx)
    assert set(terms) == {"ce", "distill"}
    feats, logits = model(batch.x)
    target = teacher_target(teachers.values(), batch.x)
    assert torch.allclose(target.norm(dim=1), torch.ones(16), atol=1e-5)
    assert torch.allclose(target[:, :64].norm(dim=1), torch.full((16,), 0.5**0.5), atol=1e-5)
    assert torch.allclose(feats.norm(dim=1), torch.ones(16), atol=1e-5)
    cos = (feats * target).sum(1)
    assert torch.allclose(terms["distill"], 0.3 * 50.0 * (1 - cos).mean(), atol=1e-4)
    assert torch.allclose(terms["ce"], 0.7 * F.cross_entropy(logits, batch.y), atol=1e-5)


def test_student_init_does_not_depend_on_its_teachers(data):
    teacher = _artifact()  # (seeds torch itself)
    torch.manual_seed(0)
    _, _, _, alone = _build(_student({}, alpha=0.0), data, {})
    torch.manual_seed(0)
    _, _, _, taught = _build(_student({"teacher0": tiny_ce()}), data, {"teacher0": teacher})
    a, b = alone.state_dict(), taught.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_student_without_projection(data):
    spec = _student({"teacher0": tiny_ce()}, use_projection=False)
    _, _, _, model = _build(spec, data, {"teacher0": _artifact()})
    assert not any(k.startswith("projection") for k in model.state_dict())
    assert model(torch.zeros(2, 3, 32, 32))[0].shape == (2, 64)


def _config_error(spec: StageSpec, data, inputs: dict[str, UpstreamArtifact], match: str):
    with pytest.raises(ConfigError, match=match) as err:
        _build(spec, data, inputs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_student_errors_name_cause_and_fix(data):
    msg = _config_error(_student({}), data, {}, "needs at least one teacher input")
    assert "alpha=0.4" in msg and "set alpha=0" in msg
    _config_error(
        _student({"features": tiny_ce()}), data, {"features": _artifact()}, "teacher0, teacher1"
    )
    _config_error(
        _student({"teacher01": tiny_ce()}), data, {"teacher01": _artifact()}, "teacher01"
    )
    wide = {"teacher0": _artifact(), "teacher1": _artifact("resnet18")}
    msg = _config_error(
        _student({"teacher0": tiny_ce(), "teacher1": tiny_ce(seed=1)}), data, wide, "one feature"
    )
    assert "teacher0=64" in msg and "teacher1=512" in msg
    one = {"teacher0": _artifact()}
    msg = _config_error(_student({"teacher0": tiny_ce()}, proj_dim=100), data, one, "proj_dim")
    assert "proj_dim=100" in msg and "64" in msg
    two = {"teacher0": _artifact(), "teacher1": _artifact(seed=1)}
    spec = _student({"teacher0": tiny_ce(), "teacher1": tiny_ce(seed=1)}, use_projection=False)
    _config_error(spec, data, two, "no projection.*128")
    _config_error(_student({"teacher0": tiny_ce()}), data, {}, "no upstream artifact")
    headless = UpstreamArtifact(key="k", spec=one["teacher0"].spec, state_dict={})
    _config_error(_student({"teacher0": tiny_ce()}), data, {"teacher0": headless}, "backbone")


@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        ("cbd_teacher", {"augment": "colour"}, "'vanilla', 'data_aug'"),
        ("cbd_student", {"alpha": 1.5}, "alpha"),
        ("cbd_student", {"beta": -1.0}, "beta"),
        ("cbd_student", {"proj_dim": 0}, "proj_dim"),
        ("cbd_student", {"proj_dim": 1.5}, "proj_dim"),
    ],
)
def test_params_are_checked(kind, params, match):
    spec = StageSpec(kind=kind, data=TINY, train=tiny_ce().train, params=params)
    with pytest.raises(ConfigError, match=match):
        parse_params(get_objective(kind), spec)


# --- end to end through the pipeline and the artifact store --------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two teachers (vanilla seed 1, data_aug seed 2), then a student distilling both."""
    store_uri = str(tmp_path_factory.mktemp("cbd") / "store")
    spec = _student({"teacher0": _teacher("vanilla", 1), "teacher1": _teacher("data_aug", 2)}, 2)
    outcomes = run_pipeline(spec, TrialContext(store_uri=store_uri, in_process="cpu"))
    return spec, store_uri, outcomes


def test_pipeline_trains_teachers_then_student(trained, data):
    spec, _, outcomes = trained
    assert [o.spec.kind for o in outcomes] == ["cbd_teacher", "cbd_teacher", "cbd_student"]
    assert not any(o.reused for o in outcomes)
    history = outcomes[-1].artifact.metrics()["history"]
    assert all({"loss/ce", "loss/distill"} <= set(h) for h in history)
    assert history[-1]["loss/distill"] < history[0]["loss/distill"]
    weights = outcomes[-1].artifact.state_dict()
    fresh = CBDStudentModel(create_model("resnet8", 4).backbone, 4, proj_dim=128, scale=16.0)
    assert set(weights) == set(fresh.state_dict())  # the student only: no teacher weights
    assert weights["projection.0.weight"].shape == (128, 64)
    teacher_hist = outcomes[0].artifact.metrics()["history"]
    assert set(k for k in teacher_hist[0] if k.startswith("loss/")) == {"loss/ce"}


def test_student_run_leaves_teachers_frozen(trained, data, tmp_path):
    spec, store_uri, outcomes = trained

    class Observed(CBDStudent):
        def build(self, ctx):
            type(self).ctx = ctx
            return super().build(ctx)

    objective = Observed
    one_epoch = _student(spec.input_dict, 1)
    store = ArtifactStore(store_uri)
    inputs = upstream(store, {n: s.key for n, s in spec.inputs})
    run = StageRun(one_epoch, objective, data, inputs=inputs, out_dir=str(tmp_path / "out"))
    summary = run_stage(run, LocalSession("cpu"))
    assert summary["status"] == "ok"
    teachers = objective.ctx.aux["teachers"]
    for name, teacher in teachers.items():
        stored = store.open(spec.input_dict[name].key).state_dict()
        for key, value in teacher.state_dict().items():  # weights and BN statistics
            assert torch.equal(value, stored[f"backbone.{key}"]), (name, key)
        assert not any(m.training for m in teacher.modules())
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith("teacher") for k in exported)
    assert len([k for k in exported if k.startswith("backbone.")]) == len(
        teachers["teacher0"].state_dict()
    )


def test_alpha_zero_needs_no_teachers(tmp_path):
    spec = _student({}, alpha=0.0, proj_dim=128)
    outcome = run_pipeline(spec, TrialContext(store_uri=str(tmp_path / "s"), in_process="cpu"))
    history = outcome[-1].artifact.metrics()["history"]
    assert "loss/ce" in history[0] and "loss/distill" not in history[0]
    assert outcome[-1].artifact.state_dict()["head.weight"].shape == (4, 128)
