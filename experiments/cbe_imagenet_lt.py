"""CBE on ImageNet-LT with the official settings (docs/methods/cbe.md), for users with the data.

Generalist: ResNet-10 from scratch with the original's Linear -> 512 + ReLU after pooling
(``fc512``), SGD 0.9, lr 0.1, batch 256, wd 5e-4, cosine over 100 epochs, best val top-1 with
patience 15, seed 5021. Experts: many [100, inf) num_learnable -1, medium [20, 100) 3
(classifier + FC + layer4), few [0, 20) 1; open ratio 16 for all; many and medium StepLR (x0.1
every 10 epochs, capped at 100), few cosine over 60 epochs; patience 15. Calibration: lr 0.1,
batch 256, StepLR 30 / 0.1, patience 30, on the val logits. Shot groups: many >= 100 training
images (``DataSpec.many_inclusive``, CBE's rule: 391 / 473 / 136 classes, not 385 / 479 / 136).

BatchNorm of the experts' frozen parts: ``bn="official"`` (the original code: they re-estimate
their running statistics on the expert's data, ``update_frozen_bn``) and ``bn="frozen"``
(ray-lt's default: they keep the generalist's). Both are rows: the second costs only the medium
and few experts again (the many expert trains everything and is shared), far less than the
generalist.

Training images get RandomResizedCrop 224 + flip + ColorJitter(0.4, 0.4, 0.4) (``rrc_flip_jitter``;
at 224 px ImageNet-LT streams through Ray Data, the crop on CPU workers, the jitter on the GPU).

    RAY_LT_DATA=/data python -m ray_lt.sweep experiments/cbe_imagenet_lt.py
    # /data/ImageNet_LT/ImageNet_LT_{train,val,test}.txt with the ImageNet train/ and val/ beside

The smoke variant (``--smoke``) runs the pipeline with ResNet-10 on a tiny tree in the same
format at 32 px (6 classes, see ``ray_lt.recipes.large.SMOKE_CBE_SPLITS``), inline on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.recipes.cbe import CIFAR_CALIBRATION, SMOKE_CALIBRATION, cbe
from ray_lt.recipes.large import (
    GPU_STAGE,
    SMOKE_CBE_SPLITS,
    SMOKE_RESOURCES,
    SMOKE_TRAIN,
    smoke_data,
)
from ray_lt.spec import StageSpec, TrainSpec

DATA = DataSpec(name="imagenet_lt", many_inclusive=True)
SEED = 5021
GENERALIST = TrainSpec(
    epochs=100, batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
    augment="rrc_flip_jitter", select="best", patience=15,
)  # fmt: skip
STEP_EXPERT = GENERALIST.replace(schedule="step", milestones=tuple(range(10, 100, 10)), gamma=0.1)
COSINE_EXPERT = GENERALIST.replace(epochs=60)
SPLITS = ((100, None), (20, 100), (0, 20))


SMOKE_GENERALIST = SMOKE_TRAIN.replace(augment="rrc_flip_jitter")
SMOKE_EXPERT = SMOKE_GENERALIST.replace(select="best", patience=15)


def pipeline(config: dict[str, Any]) -> StageSpec:
    return cbe(
        config["seed"],
        splits=SPLITS,
        open_ratio=16.0,
        num_learnable=(-1, 3, 1),
        calibration=config["calibration"],
        routing=config.get("routing", "fused"),
        data=DATA,
        backbone="resnet10",
        fc512=True,
        update_frozen_bn=config.get("bn", "official") == "official",
        generalist_train=GENERALIST,
        expert_train=(STEP_EXPERT, STEP_EXPERT, COSINE_EXPERT),
        calibration_train=CIFAR_CALIBRATION,
    )


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return cbe(
        config["seed"],
        splits=SMOKE_CBE_SPLITS,
        open_ratio=16.0,
        num_learnable=(-1, 3, 1),
        calibration=config["calibration"],
        data=dataclasses.replace(smoke_data("imagenet_lt"), many_inclusive=True),
        backbone="resnet10",
        fc512=True,
        update_frozen_bn=True,
        generalist_train=SMOKE_GENERALIST,
        expert_train=SMOKE_EXPERT,
        calibration_train=SMOKE_CALIBRATION,
    )


experiment = Experiment(
    name="cbe_imagenet_lt",
    pipeline=pipeline,
    param_space={
        "calibration": tune.grid_search(["full", "prior", "none"]),
        "bn": tune.grid_search(["official", "frozen"]),
    },
    search="grid",
    seeds=(SEED,),
    max_concurrent_trials=1,
    scheduler=None,
    resources=GPU_STAGE,
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={"calibration": tune.grid_search(["full"])},
        resources=SMOKE_RESOURCES,
    ),
)
