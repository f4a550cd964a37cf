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
) -> StageSpec:
    """A teacher named ``<augment><seed>``; its seed is part of its config (and key)."""
    augment, seed = parse_teacher(name)
    return StageSpec(
        kind="cbd_teacher",
        name=f"teacher_{name}",
        data=data,
        train=train.replace(seed=seed),
        params={"backbone": backbone, "scale": scale, "augment": augment},
    )


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
) -> StageSpec:
    """A CBD student over the named teachers ("vanilla1+vanilla2", or a list); alpha=0 is
    class-balanced training from scratch and takes no teachers."""
    names = split_teachers(teachers) if isinstance(teachers, str) else list(teachers)
    if alpha == 0:
        names = []
    inputs = {
        f"teacher{i}": cbd_teacher(
            n, data=data, train=teacher_train, backbone=backbone, scale=scale
        )
        for i, n in enumerate(names)
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
        },
        inputs=inputs,
    )


# Smoke variants: small synthetic data and two epochs of ResNet-8, minutes on 2 CPU cores.
SMOKE_DATA = DataSpec(name="synthetic_lt", num_classes=10, max_per_class=100, imbalance=20.0)
SMOKE_TRAIN = CIFAR_CE.replace(epochs=2, warmup_epochs=0, batch_size=32, lr=0.05, eval_every=2)
