"""The published CIFAR recipes as values, and the baseline pipeline built from them.

Experiment files, benchmarks and later methods (CBD's teachers, CBE's generalist) share these,
so "the CE recipe" means one thing everywhere. Nothing here imports Ray.
"""

from __future__ import annotations

from ray_lt.data.spec import DataSpec
from ray_lt.errors import ConfigError
from ray_lt.spec import StageSpec, TrainSpec
from ray_lt.stages.cbd import TEACHER_AUGMENTS

CIFAR100_LT_100 = DataSpec(name="cifar100_lt", imbalance=100.0)

# LDAM-DRW's CE schedule: SGD 0.9, lr 0.1, batch 128, wd 2e-4, 200 epochs, 5 warm-up epochs,
# lr x0.01 at 160 and x0.0001 at 180.
CIFAR_CE = TrainSpec(
    epochs=200,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    weight_decay=2e-4,
    schedule="step",
    milestones=(160, 180),
    gamma=0.01,
    warmup_epochs=5,
    eval_every=10,
)

# cRT / LWS on frozen CE features: class-balanced sampling, 10 epochs, lr 0.1, cosine.
CIFAR_DECOUPLED = TrainSpec(
    epochs=10,
    batch_size=128,
    lr=0.1,
    weight_decay=5e-4,
    schedule="cosine",
    sampler="class_balanced",
)

# τ-norm: post-hoc on the CE stage, nothing trains (epochs=0), no image augmentation.
CIFAR_TAU_NORM = TrainSpec(epochs=0, batch_size=128, augment="none")

BASELINES = ("ce", "crt", "lws", "tau_norm")


def baseline(
    method: str,
    seed: int,
    *,
    data: DataSpec = CIFAR100_LT_100,
    ce_train: TrainSpec = CIFAR_CE,
    decoupled_train: TrainSpec = CIFAR_DECOUPLED,
    backbone: str = "resnet32",
    tau_norm_train: TrainSpec = CIFAR_TAU_NORM,
) -> StageSpec:
    """CE, or cRT / LWS / τ-norm on the same seed's CE stage (which every method shares)."""
    ce = StageSpec(
        kind="ce", data=data, train=ce_train.replace(seed=seed), params={"backbone": backbone}
    )
    if method == "ce":
        return ce
    train = tau_norm_train if method == "tau_norm" else decoupled_train
    return StageSpec(
        kind=method,
        data=data,
        train=train.replace(seed=seed),
        inputs={"features": ce},
    )


def smoke_baseline(method: str, seed: int) -> StageSpec:
    """``baseline`` for CPUs: one epoch of each stage with ResNet-8 on the real CIFAR-100-LT,
    so the smoke variants of the baseline experiments still exercise the real data path."""
    return baseline(
        method,
        seed,
        ce_train=CIFAR_CE.replace(epochs=1, warmup_epochs=0, eval_every=1),
        decoupled_train=CIFAR_DECOUPLED.replace(epochs=1),
        backbone="resnet8",
    )


# CBD's CIFAR recipe: teachers follow the CE recipe with a cosine head (fixed scale 16 for 64-d
# features); the student trains from scratch with class-balanced sampling and distils the
# concatenated, renormalised teacher features.
CIFAR_CBD_TEACHER = CIFAR_CE
CIFAR_CBD_STUDENT = CIFAR_CE.replace(sampler="class_balanced")
TEACHER_POOL = ("vanilla1", "vanilla2", "data_aug1", "data_aug2")


def parse_teacher(name: str) -> tuple[str, int]:
    """``"data_aug2"`` -> ("data_aug", 2): the teacher's augmentation and its seed."""
    for augment in TEACHER_AUGMENTS:
        rest = name[len(augment) :]
        if name.startswith(augment) and rest.isdigit():
            return augment, int(rest)
    raise ConfigError(
        f"unknown teacher '{name}'; a teacher is <augment><seed> with augment in "
        f"{list(TEACHER_AUGMENTS)}, e.g. {', '.join(TEACHER_POOL)}"
    )


def split_teachers(subset: str) -> list[str]:
    """``"vanilla1+data_aug2"`` -> ["vanilla1", "data_aug2"] (the encoding Optuna searches)."""
    names = [n for n in subset.split("+") if n] if subset else []
    if len(set(names)) != len(names):
        raise ConfigError(f"teacher subset '{subset}' names a teacher twice; list each once")
    return names


def cbd_teacher(
    name: str,
    *,
    data: DataSpec = CIFAR100_LT_100,
    train: TrainSpec = CIFAR_CBD_TEACHER,
    backbone: str = "resnet32",
    scale: float = 16.0,
    zero_init_residual: bool = False,
) -> StageSpec:
    """A teacher named ``<augment><seed>``; its seed is part of its config (and key).

    ``zero_init_residual`` starts the last BatchNorm of every residual block at γ = 0, as CBD's
    ResNets do; it enters the key only when on, so stores made without it keep their keys.
    """
    augment, seed = parse_teacher(name)
    return StageSpec(
        kind="cbd_teacher",
        name=f"teacher_{name}",
        data=data,
        train=train.replace(seed=seed),
        params={
            "backbone": backbone,
            "scale": scale,
            "augment": augment,
            **_zero_init(zero_init_residual),
        },
    )


def _zero_init(on: bool) -> dict[str, dict[str, bool]]:
    """The backbone option for zero-γ residual BatchNorms, or nothing (the default init)."""
    return {"backbone_kwargs": {"zero_init_residual": True}} if on else {}


def cbd(
    teachers: str | list[str],
    seed: int,
    *,
    alpha: float = 0.4,
    beta: float = 100.0,
    data: DataSpec = CIFAR100_LT_100,
    teacher_train: TrainSpec = CIFAR_CBD_TEACHER,
    student_train: TrainSpec = CIFAR_CBD_STUDENT,
    backbone: str = "resnet32",
    scale: float = 16.0,
    proj_dim: int | None = None,
    use_projection: bool = True,
    zero_init_residual: bool = False,
    distill: str = "feature",
    temperature: float = 4.0,
    adapter: bool = False,
) -> StageSpec:
    """A CBD student over the named teachers ("vanilla1+vanilla2", or a list); alpha=0 is
    class-balanced training from scratch and takes no teachers.

    ``zero_init_residual`` applies to the teachers and the student alike. ``distill="logit"``
    swaps the feature term for KL to the teachers' mean logits at ``temperature``; ``adapter``
    distils through a linear map to the teachers' width (docs/methods/cbd.md). Each of these
    enters the keys only when not at its default.
    """
    names = split_teachers(teachers) if isinstance(teachers, str) else list(teachers)
    if alpha == 0:
        names = []
    inputs = {
        f"teacher{i}": cbd_teacher(
            n,
            data=data,
            train=teacher_train,
            backbone=backbone,
            scale=scale,
            zero_init_residual=zero_init_residual,
        )
        for i, n in enumerate(names)
    }
    variant = {
        **({} if distill == "feature" else {"distill": distill}),
        **({} if temperature == 4.0 else {"temperature": temperature}),
        **({"adapter": True} if adapter else {}),
        **_zero_init(zero_init_residual),
    }
    return StageSpec(
        kind="cbd_student",
        name="student",
        data=data,
        train=student_train.replace(seed=seed),
        params={
            "backbone": backbone,
            "alpha": alpha,
            "beta": beta,
            "scale": scale,
            **({"proj_dim": proj_dim} if proj_dim is not None else {}),
            **({} if use_projection else {"use_projection": False}),
            **variant,
        },
        inputs=inputs,
    )


# TailCalibX's third-party CIFAR recipe for CBD (docs/methods/cbd.md): CosineCE teachers and the
# student both SGD 0.9, lr 0.2, batch 128, wd 5e-4 (a plain torch weight decay), cosine to 0,
# 150 epochs; the student samples class-aware with 4 images per class visit.
TAILCALIBX_TEACHER = TrainSpec(
    epochs=150,
    batch_size=128,
    lr=0.2,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=0,
    eval_every=10,
)
TAILCALIBX_STUDENT = TAILCALIBX_TEACHER.replace(sampler="class_aware", sampler_params={"k": 4})
TAILCALIBX_ALPHA, TAILCALIBX_BETA, TAILCALIBX_PROJ_DIM = 0.8, 100.0, 128
TAILCALIBX_TEACHER_SEEDS = (10, 20, 30)  # students 1, 2, 3 each take teacher 10 x seed


def tailcalibx_teachers(seed: int, mode: str = "per_seed") -> str:
    """The teachers a TailCalibX student distils: ``per_seed`` is the released script (student
    seed s takes one vanilla teacher of seed 10 s), ``all_three`` all of vanilla10/20/30."""
    if mode == "per_seed":
        return f"vanilla{10 * seed}"
    if mode != "all_three":
        raise ConfigError(f"unknown TailCalibX teachers '{mode}'; use 'per_seed' or 'all_three'")
    return "+".join(f"vanilla{s}" for s in TAILCALIBX_TEACHER_SEEDS)


def cbd_tailcalibx(
    seed: int,
    *,
    teachers: str = "per_seed",
    data: DataSpec = CIFAR100_LT_100,
    teacher_train: TrainSpec = TAILCALIBX_TEACHER,
    student_train: TrainSpec = TAILCALIBX_STUDENT,
    backbone: str = "resnet32",
) -> StageSpec:
    """TailCalibX's CIFAR CBD: alpha 0.8, beta 100, a 128-d classifier feature distilled through
    a linear adapter to the teachers' width, class-aware sampling (4 per class), 150 epochs.

    Args:
        seed: the student's seed (the released script runs 1, 2 and 3).
        teachers: ``per_seed`` or ``all_three`` (``tailcalibx_teachers``), or a teacher list
            such as ``"vanilla10+vanilla20"``.
        data, teacher_train, student_train, backbone: the dataset, schedules and network.
    """
    modes = ("per_seed", "all_three")
    named = tailcalibx_teachers(seed, teachers) if teachers in modes else teachers
    return cbd(
        named,
        seed,
        alpha=TAILCALIBX_ALPHA,
        beta=TAILCALIBX_BETA,
        data=data,
        teacher_train=teacher_train,
        student_train=student_train,
        backbone=backbone,
        proj_dim=TAILCALIBX_PROJ_DIM,
        adapter=True,
    )


# Smoke variants: small synthetic data and two epochs of ResNet-8, minutes on 2 CPU cores.
SMOKE_DATA = DataSpec(name="synthetic_lt", num_classes=10, max_per_class=100, imbalance=20.0)
SMOKE_TRAIN = CIFAR_CE.replace(epochs=2, warmup_epochs=0, batch_size=32, lr=0.05, eval_every=2)
