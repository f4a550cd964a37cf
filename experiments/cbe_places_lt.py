"""CBE on Places-LT with the official settings (docs/methods/cbe.md), for users with the
data and ImageNet-pretrained ResNet-152 weights.

Generalist: ResNet-152 initialised from ImageNet weights the user supplies as a torchvision-
layout state dict (``.safetensors`` / ``.pt``; the original uses OLTR's Caffe weights, convert
them first) named by ``$RAY_LT_RESNET152_WEIGHTS``, plus a new Linear 2048 -> 512 + ReLU after
pooling (``fc512``, as the original adds); SGD 0.9, lr 0.01, batch 32, wd 5e-4, StepLR x0.1
every 10 epochs, best val top-1 with patience 15, seed 5021. Experts: many [100, inf)
num_learnable -1 open 16, medium [20, 100) 3 (classifier + FC + layer4) open 8, few [0, 20) 3
open 8, all StepLR 10 / 0.1 with patience 15. Calibration as on ImageNet-LT. Shot groups: many
>= 100 training images (``DataSpec.many_inclusive``, CBE's rule: 132 / 162 / 71 classes, not
131 / 163 / 71).

BatchNorm of the experts' frozen parts: ``bn="official"`` (they re-estimate their statistics on
the expert's data, as the original code does) and ``bn="frozen"`` (ray-lt's default); the
second row retrains only the medium and few experts.

Training images get RandomResizedCrop 224 + flip + ColorJitter(0.4, 0.4, 0.4)
(``rrc_flip_jitter``), streamed through Ray Data at 224 px.

    RAY_LT_RESNET152_WEIGHTS=/path/resnet152.safetensors RAY_LT_DATA=/data \
        python -m ray_lt.sweep experiments/cbe_places_lt.py
    # /data/Places_LT/Places_LT_{train,val,test}.txt with the Places images beside them

The smoke variant (``--smoke``) runs the pipeline with ResNet-152 from the same weights file on a
tiny tree in the Places-LT format at 32 px, inline on a CPU.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.errors import ConfigError
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

DATA = DataSpec(name="places_lt", many_inclusive=True)
SEED = 5021
WEIGHTS_ENV = "RAY_LT_RESNET152_WEIGHTS"
TRAIN = TrainSpec(
    epochs=100, batch_size=32, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step",
    milestones=tuple(range(10, 100, 10)), gamma=0.1, augment="rrc_flip_jitter", select="best",
    patience=15,
)  # fmt: skip
SPLITS = ((100, None), (20, 100), (0, 20))


def weights_path() -> str:
    path = os.environ.get(WEIGHTS_ENV)
    if not path:
        raise ConfigError(
            f"Places-LT's generalist starts from ImageNet-pretrained ResNet-152 weights; set "
            f"{WEIGHTS_ENV} to a torchvision-layout .safetensors or .pt state dict"
        )
    return os.path.abspath(path)


SMOKE = SMOKE_TRAIN.replace(augment="rrc_flip_jitter", select="best", patience=15)


def pipeline(config: dict[str, Any], smoke: bool = False) -> StageSpec:
    return cbe(
        config["seed"],
        splits=SMOKE_CBE_SPLITS if smoke else SPLITS,
        open_ratio=(16.0, 8.0, 8.0),
        num_learnable=(-1, 3, 3),
        calibration=config["calibration"],
        data=dataclasses.replace(smoke_data("places_lt"), many_inclusive=True) if smoke else DATA,
        backbone="resnet152",
        backbone_kwargs={"weights_path": weights_path()},
        fc512=True,
        update_frozen_bn=config.get("bn", "official") == "official",
        generalist_train=SMOKE if smoke else TRAIN,
        expert_train=SMOKE if smoke else TRAIN,
        calibration_train=SMOKE_CALIBRATION if smoke else CIFAR_CALIBRATION,
    )


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return pipeline(config, smoke=True)


experiment = Experiment(
    name="cbe_places_lt",
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
