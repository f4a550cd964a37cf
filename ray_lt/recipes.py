"""The CIFAR recipes of METHODS.md as values, and the baseline pipeline built from them.

Experiment files, benchmarks and later methods (CBD's teachers, CBE's generalist) share these,
so "the CE recipe" means one thing everywhere. Nothing here imports Ray.
"""

from __future__ import annotations

from ray_lt.data.spec import DataSpec
from ray_lt.spec import StageSpec, TrainSpec

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

BASELINES = ("ce", "crt", "lws")


def baseline(
    method: str,
    seed: int,
    *,
    data: DataSpec = CIFAR100_LT_100,
    ce_train: TrainSpec = CIFAR_CE,
    decoupled_train: TrainSpec = CIFAR_DECOUPLED,
    backbone: str = "resnet32",
) -> StageSpec:
    """CE, or cRT / LWS on the same seed's CE stage (which every method shares)."""
    ce = StageSpec(
        kind="ce", data=data, train=ce_train.replace(seed=seed), params={"backbone": backbone}
    )
    if method == "ce":
        return ce
    return StageSpec(
        kind=method,
        data=data,
        train=decoupled_train.replace(seed=seed),
        inputs={"features": ce},
    )
