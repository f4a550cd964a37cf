"""CBD's fidelity to the official code, and its documented variants.

What the official release does and ray-lt now does too: data_aug teachers distort the colours of
the engine's own crop; the ImageNet-scale recipe starts residual BatchNorms at γ = 0 and decays
weights by the TF penalty's gradient (wd/2); the student never starts from a teacher's init.
The variants beside it: logit (KL) distillation and TailCalibX's CIFAR recipe. Everything runs
on real modules, data and specs, in-process, without Ray.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.data import augment_batch, load_dataset
from ray_lt.data.augment import colour_distort
from ray_lt.engine.prepare import make_optimizer
from ray_lt.errors import ConfigError
from ray_lt.experiment import load_experiment
from ray_lt.objective import Batch, StageContext, UpstreamArtifact, make_objective
from ray_lt.pipeline import TrialContext, run_pipeline
from ray_lt.recipes import cbd, cbd_tailcalibx
from ray_lt.spec import StageSpec, walk
from ray_lt.stages.cbd import colour_view, init_seed
from ray_lt.stages.cbd_models import kl_distillation, teacher_mean_logits
from ray_lt.stages.upstream import skeleton
from tests.conftest import TINY, tiny_ce

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ctx(spec: StageSpec, data, inputs: dict[str, UpstreamArtifact] | None = None):
    return StageContext(
        spec=spec,
        data=data,
        device=torch.device("cpu"),
        inputs=inputs or {},
        class_counts=torch.as_tensor(data.class_counts),
    )


def _batch(data, n: int = 32, seed: int = 0, augment: str = "crop_flip") -> Batch:
    """A batch as the engine hands it over: its view, and the generator it drew the view from."""
    gen = _gen(seed)
    raw = torch.from_numpy(data.train.images[:n].copy())
    x = augment_batch(augment, raw, gen, data.mean, data.std)
    y = torch.from_numpy(data.train.labels[:n].copy())
    return Batch(x=x, y=y, index=torch.arange(n), raw=raw, generator=gen)


def _replay(batch: Batch, state: torch.Tensor) -> Batch:
    return Batch(batch.x, batch.y, batch.index, batch.raw, _gen().set_state(state))


def _teacher_spec(augment: str = "vanilla", seed: int = 1, **params: object) -> StageSpec:
    return StageSpec(
        kind="cbd_teacher",
        data=TINY,
        train=tiny_ce(epochs=1, seed=seed).train,
        params={"backbone": "resnet8", "augment": augment, **params},
    )


def _student_spec(teachers: dict[str, StageSpec], seed: int = 1, **params) -> StageSpec:
    train = tiny_ce(epochs=1, seed=seed, sampler="class_balanced").train
    return StageSpec(
        kind="cbd_student",
        data=TINY,
        train=train,
        params={"backbone": "resnet8", **params},
        inputs=teachers,
    )


def _built_teacher(spec: StageSpec, data) -> nn.Module:
    """The teacher's model as the engine builds it: the global RNG seeded with its seed."""
    torch.manual_seed(spec.train.seed)
    return make_objective(spec).build(_ctx(spec, data))


def _artifact(spec: StageSpec, model: nn.Module) -> UpstreamArtifact:
    doc = {"key": spec.key, "spec": spec.to_dict()}
    return UpstreamArtifact(key=spec.key, spec=doc, state_dict=model.state_dict())


def _unnormalise(x: torch.Tensor, data) -> torch.Tensor:
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    return x * std + mean


# --- 1. data_aug teachers: colour on the engine's crop ---------------------------------------


def test_data_aug_input_is_colour_distort_of_the_engine_view(data):
    spec = _teacher_spec("data_aug")
    model, ctx = _built_teacher(spec, data), _ctx(spec, data)
    batch = _batch(data)
    state = batch.generator.get_state()
    view = colour_view(batch, ctx)
    images = _unnormalise(batch.x, data).clamp(0.0, 1.0)
    expected = colour_distort(images, _gen().set_state(state), p_jitter=0.8, p_grey=0.2)
    assert torch.allclose(_unnormalise(view, data), expected, atol=1e-5)
    model.eval()  # the same BatchNorm statistics for every forward below
    with torch.no_grad():
        ce = make_objective(spec).loss(model, _replay(batch, state), ctx)["ce"]
        assert torch.allclose(ce, F.cross_entropy(model(view)[1], batch.y), atol=1e-5)
        assert not torch.allclose(ce, F.cross_entropy(model(batch.x)[1], batch.y), atol=1e-3)


def test_data_aug_greys_a_fifth_keeps_the_crop_and_the_range(data):
    spec = _teacher_spec("data_aug")
    batch = _batch(data, n=len(data.train.labels), seed=3)
    reps = 2000 // batch.x.shape[0] + 1
    x = batch.x.repeat(reps, 1, 1, 1)
    many = Batch(x, batch.y.repeat(reps), batch.index.repeat(reps), batch.raw, batch.generator)
    out = _unnormalise(colour_view(many, _ctx(spec, data)), data)
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5
    grey = ((out[:, 0] - out[:, 1]).abs() < 1e-5) & ((out[:, 1] - out[:, 2]).abs() < 1e-5)
    rate = grey.flatten(1).all(1).float().mean().item()
    assert 0.16 < rate < 0.24, rate  # p_grey = 0.2 over about 2000 images
    # images neither jittered nor greyed (p 0.2 x 0.8) keep the engine's pixels: its crop
    same = ((out - _unnormalise(x, data)).abs() < 1e-4).flatten(1).all(1).float().mean().item()
    assert 0.12 < same < 0.20, same


def test_vanilla_teacher_trains_on_the_engine_view_untouched(data):
    spec = _teacher_spec("vanilla")
    model, ctx = _built_teacher(spec, data), _ctx(spec, data)
    model.eval()
    batch = _batch(data)
    state = batch.generator.get_state()
    with torch.no_grad():
        ce = make_objective(spec).loss(model, batch, ctx)["ce"]
        assert torch.allclose(ce, F.cross_entropy(model(batch.x)[1], batch.y), atol=1e-6)
    assert torch.equal(batch.generator.get_state(), state)  # no extra draws


def test_imagenet_recipes_crop_as_cbd_does():
    for name in ("cbd_ens_imagenet_lt.py", "cbd_ens_inat18.py"):
        stages = walk(load_experiment(ROOT / "experiments" / name).pipeline(_ens_config()))
        assert {s.train.augment for s in stages} == {"rrc05_flip"}, name


# --- 2. initialisation -------------------------------------------------------------------------


def _ens_config(teachers: str = "vanilla1+data_aug1") -> dict[str, object]:
    return {"teachers": teachers, "seed": 1}


def test_imagenet_recipe_starts_residual_batchnorms_at_zero():
    spec = load_experiment(ROOT / "experiments/cbd_ens_imagenet_lt.py").pipeline(_ens_config())
    for stage in walk(spec):
        assert stage.param_dict["backbone_kwargs"] == {"zero_init_residual": True}
        backbone = skeleton(stage, 10, keep_head=False)
        blocks = [b for layer in ("layer1", "layer2", "layer3", "layer4")
                  for b in getattr(backbone, layer)]  # fmt: skip
        assert len(blocks) == 16  # ResNet-50: 3 + 4 + 6 + 3 bottlenecks
        assert all(torch.all(b.bn3.weight == 0) for b in blocks)
        assert torch.all(backbone.bn1.weight == 1)  # only the blocks' last BatchNorm


def test_cifar_recipe_keeps_its_init_and_keys_one_option_away():
    plain = cbd("vanilla1", seed=1)
    for stage in walk(plain):
        assert not {"backbone_kwargs", "distill", "temperature", "adapter"} & set(stage.param_dict)
    zero = cbd("vanilla1", seed=1, zero_init_residual=True)
    assert zero.key != plain.key
    for stage in walk(zero):
        backbone = skeleton(stage, 100, keep_head=False)
        blocks = [b for layer in (backbone.layer1, backbone.layer2, backbone.layer3)
                  for b in layer]  # fmt: skip
        assert len(blocks) == 15 and all(torch.all(b.bn2.weight == 0) for b in blocks)


def test_student_and_same_seed_teacher_start_apart(data):
    teacher_spec = _teacher_spec("vanilla", seed=1)
    teacher = _built_teacher(teacher_spec, data)
    spec = _student_spec({"teacher0": teacher_spec}, seed=1)
    inputs = {"teacher0": _artifact(teacher_spec, teacher)}

    def student() -> nn.Module:
        torch.manual_seed(spec.train.seed)  # as the engine does before build
        return make_objective(spec).build(_ctx(spec, data, inputs))

    first, again = student(), student()
    t_state, s_state = teacher.backbone.state_dict(), first.backbone.state_dict()
    convs = [k for k in t_state if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert convs and all(not torch.equal(t_state[k], s_state[k]) for k in convs)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    # the premise: drawn on the plain seed, the student's backbone was the teacher's
    torch.manual_seed(1)
    plain = make_objective(teacher_spec).build(_ctx(teacher_spec, data)).backbone.state_dict()
    assert all(torch.equal(plain[k], t_state[k]) for k in convs)
    assert init_seed(1) != init_seed(2) and init_seed(1) not in (0, 1, 2)


# --- 3. weight decay: the TF penalty's gradient is (wd / 2) theta ------------------------------


@pytest.mark.parametrize(
    ("file", "wd_official"),
    [("cbd_ens_imagenet_lt.py", 5e-4), ("cbd_ens_inat18.py", 2e-4)],
)
def test_one_sgd_step_decays_by_half_the_official_wd(file, wd_official):
    spec = load_experiment(ROOT / "experiments" / file).pipeline(_ens_config("vanilla1"))
    theta = nn.Parameter(torch.tensor([2.0, -0.5], dtype=torch.float64))
    holder = nn.Module()
    holder.theta = theta
    for stage in walk(spec):
        train = stage.train
        optimizer = make_optimizer(holder, train)
        before = theta.detach().clone()
        optimizer.zero_grad()
        (0.0 * theta).sum().backward()  # the loss has zero gradient: only the decay moves it
        optimizer.step()
        # hand-computed: lr 0.05 x (5e-4 / 2) = 1.25e-5 (ImageNet-LT), 0.05 x 1e-4 = 5e-6 (iNat)
        step = {5e-4: 1.25e-5, 2e-4: 5e-6}[wd_official]
        assert train.lr == 0.05 and math.isclose(train.lr * wd_official / 2, step)
        assert torch.allclose(before - theta.detach(), step * before, rtol=1e-9, atol=0)
        with torch.no_grad():
            theta.copy_(before)


# --- 4. logit (KL) distillation ----------------------------------------------------------------


def test_kl_term_matches_a_hand_computed_case():
    t = 2.0
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, 1.0]])  # softmax(/T): 3/4 1/4; 1/2 1/2
    student = torch.tensor([[0.0, 0.0], [5.0, 5.0]])  # softmax(/T): 1/2 1/2 both rows
    row0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = (row0 + 0.0) / 2 * t * t  # batch mean, times T^2
    assert math.isclose(kl_distillation(student, teacher, t).item(), expected, rel_tol=1e-6)
    assert kl_distillation(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_logit_student_distils_the_teachers_mean_logits(data):
    specs = {f"teacher{i}": _teacher_spec("vanilla", seed=s) for i, s in enumerate((1, 2))}
    inputs = {n: _artifact(s, _built_teacher(s, data)) for n, s in specs.items()}
    spec = _student_spec(specs, alpha=0.3, distill="logit", temperature=3.0)
    ctx = _ctx(spec, data, inputs)
    objective = make_objective(spec)
    torch.manual_seed(1)
    model = objective.build(ctx)
    assert model.feature_dim == 128  # the same student as feature distillation's
    teachers = list(ctx.aux["teachers"].values())
    assert all(not t.training and len(t(torch.zeros(1, 3, 32, 32))) == 2 for t in teachers)
    model.eval()
    batch = _batch(data)
    terms = objective.loss(model, batch, ctx)
    _, logits = model(batch.x)
    with torch.no_grad():
        mean = (teachers[0](batch.x)[1] + teachers[1](batch.x)[1]) / 2
    assert torch.allclose(teacher_mean_logits(teachers, batch.x), mean, atol=1e-6)
    p_t, log_p_s = F.softmax(mean / 3.0, 1), F.log_softmax(logits / 3.0, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    assert torch.allclose(terms["distill"], 0.3 * kl * 9.0, atol=1e-5)
    assert torch.allclose(terms["ce"], 0.7 * F.cross_entropy(logits, batch.y), atol=1e-6)


def test_distill_params_are_checked_and_keyed():
    with pytest.raises(ConfigError, match="'feature', 'logit'"):
        make_objective(_student_spec({}, alpha=0.0, distill="kl"))
    with pytest.raises(ConfigError, match="temperature"):
        make_objective(_student_spec({}, alpha=0.0, distill="logit", temperature=0.0))
    with pytest.raises(ConfigError, match="feature' only"):
        make_objective(_student_spec({}, alpha=0.0, distill="logit", beta=50.0))
    feature, logit = cbd("vanilla1", seed=1), cbd("vanilla1", seed=1, distill="logit")
    assert "distill" not in feature.param_dict and logit.param_dict["distill"] == "logit"
    assert feature.inputs == logit.inputs  # the same teachers, trained once
    kl = load_experiment(ROOT / "experiments/cbd_kl_cifar100_lt.py")
    rows = {d: kl.pipeline({"distill": d, "seed": 1}) for d in ("feature", "logit")}
    assert rows["feature"].key == cbd("vanilla1+vanilla2+data_aug1+data_aug2", seed=1).key
    assert rows["logit"].param_dict["distill"] == "logit" and kl.seeds == (1, 2, 3)


def test_logit_distillation_trains_end_to_end(tmp_path):
    spec = _student_spec({"teacher0": _teacher_spec("vanilla", 1)}, distill="logit")
    outcomes = run_pipeline(spec, TrialContext(store_uri=str(tmp_path / "s"), in_process="cpu"))
    history = outcomes[-1].artifact.metrics()["history"]
    assert {"loss/ce", "loss/distill"} <= set(history[0])
    assert math.isfinite(history[-1]["loss/distill"])


# --- 5. TailCalibX's CIFAR recipe --------------------------------------------------------------


def test_tailcalibx_recipe_carries_its_numbers():
    spec = cbd_tailcalibx(2)
    p, train = spec.param_dict, spec.train
    assert (p["alpha"], p["beta"], p["proj_dim"], p["adapter"]) == (0.8, 100.0, 128, True)
    assert (train.epochs, train.lr, train.schedule, train.batch_size) == (150, 0.2, "cosine", 128)
    assert (train.momentum, train.weight_decay, train.warmup_epochs) == (0.9, 5e-4, 0)
    assert train.sampler == "class_aware" and dict(train.sampler_params) == {"k": 4}
    assert train.seed == 2 and p["backbone"] == "resnet32"
    (teacher,) = [s for _, s in spec.inputs]  # the released script: one teacher per student
    assert teacher.param_dict["augment"] == "vanilla" and teacher.train.seed == 20
    t_train = teacher.train
    assert (t_train.epochs, t_train.lr, t_train.sampler) == (150, 0.2, "instance")
    assert (t_train.weight_decay, t_train.schedule) == (5e-4, "cosine")
    three = cbd_tailcalibx(1, teachers="all_three")
    assert sorted(s.train.seed for _, s in three.inputs) == [10, 20, 30]
    shared = {s.key for _, s in three.inputs}
    assert {s.key for seed in (1, 2, 3) for _, s in cbd_tailcalibx(seed).inputs} == shared
    with pytest.raises(ConfigError, match="unknown teacher 'all'"):
        cbd_tailcalibx(1, teachers="all")


def test_adapter_relaxes_the_width_rule_and_distils_through_a_linear_map(data):
    specs = {f"teacher{i}": _teacher_spec("vanilla", seed=s) for i, s in enumerate((1, 2))}
    inputs = {n: _artifact(s, _built_teacher(s, data)) for n, s in specs.items()}
    with pytest.raises(ConfigError, match="adapter=True"):
        make_objective(_student_spec(specs, proj_dim=32)).validate(data.class_counts)
    spec = _student_spec(specs, proj_dim=32, adapter=True, alpha=0.8)
    objective = make_objective(spec)
    objective.validate(data.class_counts)
    ctx = _ctx(spec, data, inputs)
    model = objective.build(ctx)
    assert model.head.in_dim == 32 and model.adapter.weight.shape == (128, 32)  # 2 x 64 teachers
    model.eval()
    batch = _batch(data)
    terms = objective.loss(model, batch, ctx)
    features, logits = model(batch.x)
    distilled = F.normalize(model.adapter(features), dim=1)
    with torch.no_grad():
        parts = [F.normalize(t(batch.x), dim=1) for t in ctx.aux["teachers"].values()]
    target = F.normalize(torch.cat(parts, 1), dim=1)
    cos = (distilled * target).sum(1)
    assert torch.allclose(terms["distill"], 0.8 * 100.0 * (1 - cos).mean(), atol=1e-4)
    terms["distill"].backward()
    assert model.adapter.weight.grad.abs().sum() > 0


def test_tailcalibx_recipe_trains_end_to_end(tmp_path):
    train = tiny_ce(epochs=1).train
    student = cbd_tailcalibx(1).train.replace(epochs=1, batch_size=32, lr=0.05, eval_every=1)
    spec = cbd_tailcalibx(
        1, data=TINY, teacher_train=train, student_train=student, backbone="resnet8"
    )
    smoke = load_experiment(ROOT / "experiments/cbd_tailcalibx_cifar100_lt.py", smoke=True)
    smoke_spec = smoke.pipeline({"teachers": "per_seed", "seed": 1})
    assert smoke_spec.train.sampler_params == student.sampler_params == (("k", 4),)
    outcomes = run_pipeline(spec, TrialContext(store_uri=str(tmp_path / "s"), in_process="cpu"))
    assert [o.spec.kind for o in outcomes] == ["cbd_teacher", "cbd_student"]
    weights = outcomes[-1].artifact.state_dict()
    assert weights["adapter.weight"].shape == (64, 128)  # 128-d feature -> one 64-d teacher
    assert 0.0 <= outcomes[-1].artifact.metrics()["test"]["overall"] <= 1.0
