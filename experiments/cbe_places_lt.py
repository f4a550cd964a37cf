"""CBE on Places-LT with the official settings (methods/cbe.md section 5), for users with the
data and ImageNet-pretrained ResNet-152 weights.

Generalist: ResNet-152 initialised from ImageNet weights the user supplies as a torchvision-
layout state dict (``.safetensors`` / ``.pt``; the original uses OLTR's Caffe weights, convert
them first) named by ``$RAY_LT_RESNET152_WEIGHTS``; SGD 0.9, lr 0.01, batch 32, wd 5e-4,
StepLR x0.1 every 10 epochs, best val top-1 with patience 15, seed 5021. Experts: many
[100, inf) num_learnable -1 open 16, medium [20, 100) 3 -> 2 here open 8, few [0, 20) 3 -> 2
open 8, all StepLR 10 / 0.1 with patience 15. Calibration as on ImageNet-LT.

Differences: no 512-d FC after pooling (the paper's num_learnable k >= 3 is our k - 1) and
``crop_flip`` augmentation (see experiments/cbe_imagenet_lt.py). Until the Places-LT loader
lands, the sweep stops before any trial: unknown dataset 'places_lt'.

    RAY_LT_RESNET152_WEIGHTS=/path/resnet152.safetensors RAY_LT_DATA=/path/with/Places_LT \
        python -m ray_lt.sweep experiments/cbe_places_lt.py
"""

from __future__ import annotations

import os
from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.errors import ConfigError
from ray_lt.experiment import Experiment
from ray_lt.recipes.cbe import CIFAR_CALIBRATION, cbe
from ray_lt.spec import Resources, StageSpec, TrainSpec

DATA = DataSpec(name="places_lt")
SEED = 5021
WEIGHTS_ENV = "RAY_LT_RESNET152_WEIGHTS"
TRAIN = TrainSpec(
    epochs=100, batch_size=32, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step",
    milestones=tuple(range(10, 100, 10)), gamma=0.1, select="best", patience=15,
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


def pipeline(config: dict[str, Any]) -> StageSpec:
    return cbe(
        config["seed"],
        splits=SPLITS,
        open_ratio=(16.0, 8.0, 8.0),
        num_learnable=(-1, 2, 2),
        calibration=config["calibration"],
        data=DATA,
        backbone="resnet152",
        backbone_kwargs={"weights_path": weights_path()},
        generalist_train=TRAIN,
        expert_train=TRAIN,
        calibration_train=CIFAR_CALIBRATION,
    )


experiment = Experiment(
    name="cbe_places_lt",
    pipeline=pipeline,
    param_space={"calibration": tune.grid_search(["full", "prior", "none"])},
    search="grid",
    seeds=(SEED,),
    max_concurrent_trials=1,
    scheduler=None,
    resources=Resources(num_workers=1, cpus_per_worker=8, gpus_per_worker=1),
)
