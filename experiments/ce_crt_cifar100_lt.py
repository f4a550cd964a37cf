"""CE, cRT and LWS on CIFAR-100-LT (imbalance 100), ResNet-32, the literature's CIFAR recipe.

CE: SGD momentum 0.9, lr 0.1, batch 128, weight decay 2e-4, 200 epochs, 5-epoch linear warm-up,
lr x0.01 at epoch 160 and x0.0001 at 180 (LDAM-DRW's schedule). cRT / LWS: the CE stage's frozen
features, class-balanced sampling, 10 epochs, lr 0.1 with a cosine schedule. The grid runs each
method with three seeds; cRT and LWS reuse the CE stage of their seed, so CE trains 3 times, not 9.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/ce_crt_cifar100_lt.py \
        --gpus-per-worker 0.25
    python -m ray_lt.report experiments/ce_crt_cifar100_lt.py

Literature (METHODS.md): CE 38.3, cRT about 43.3 overall.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.spec import StageSpec, TrainSpec

DATA = DataSpec(name="cifar100_lt", imbalance=100.0)
CE_RECIPE = TrainSpec(
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
DECOUPLED_RECIPE = TrainSpec(
    epochs=10,
    batch_size=128,
    lr=0.1,
    weight_decay=5e-4,
    schedule="cosine",
    sampler="class_balanced",
)


def pipeline(
    config: dict[str, Any],
    ce_train: TrainSpec = CE_RECIPE,
    decoupled_train: TrainSpec = DECOUPLED_RECIPE,
    backbone: str = "resnet32",
) -> StageSpec:
    """``method`` in {"ce", "crt", "lws"}; cRT and LWS sit on the seed's CE stage."""
    seed = config["seed"]
    ce = StageSpec(
        kind="ce",
        data=DATA,
        train=ce_train.replace(seed=seed),
        params={"backbone": backbone},
    )
    if config["method"] == "ce":
        return ce
    return StageSpec(
        kind=config["method"],
        data=DATA,
        train=decoupled_train.replace(seed=seed),
        inputs={"features": ce},
    )


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    """One epoch of each stage with ResNet-8 on the real CIFAR-100-LT: the real data path."""
    return pipeline(
        config,
        ce_train=CE_RECIPE.replace(epochs=1, warmup_epochs=0, eval_every=1),
        decoupled_train=DECOUPLED_RECIPE.replace(epochs=1),
        backbone="resnet8",
    )


experiment = Experiment(
    name="ce_crt_cifar100_lt",
    pipeline=pipeline,
    param_space={"method": tune.grid_search(["ce", "crt", "lws"])},
    search="grid",
    seeds=(0, 1, 2),
    max_concurrent_trials=4,
    scheduler=None,
    smoke=Experiment(
        name="ce_crt_cifar100_lt-smoke",
        pipeline=smoke_pipeline,
        param_space={"method": tune.grid_search(["ce", "crt"])},
        search="grid",
        seeds=(0,),
        max_concurrent_trials=2,
        scheduler=None,
    ),
)
