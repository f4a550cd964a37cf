"""CBE on ImageNet-LT with the official settings (methods/cbe.md section 5), for users with the
data.

Generalist: ResNet-10 from scratch, SGD 0.9, lr 0.1, batch 256, wd 5e-4, cosine over 100
epochs, best val top-1 with patience 15, seed 5021. Experts: many [100, inf) num_learnable -1,
medium [20, 100) 3 -> 2 here, few [0, 20) 1; open ratio 16 for all; many and medium StepLR
(x0.1 every 10 epochs, capped at 100), few cosine over 60 epochs; patience 15. Calibration:
lr 0.1, batch 256, StepLR 30 / 0.1, patience 30, on the val logits.

Differences, until the models / augment registries grow them: our ResNet-10 has no 512-d FC
after pooling (so the paper's num_learnable k >= 3 is our k - 1), and training uses
``crop_flip`` where the original uses RandomResizedCrop 224 + flip + ColorJitter(0.4, 0.4, 0.4).
Until the ImageNet-LT loader lands, the sweep stops before any trial with a one-line error:
unknown dataset 'imagenet_lt', followed by the datasets that exist.

    RAY_LT_DATA=/path/with/ImageNet_LT python -m ray_lt.sweep experiments/cbe_imagenet_lt.py
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.recipes.cbe import CIFAR_CALIBRATION, cbe
from ray_lt.spec import Resources, StageSpec, TrainSpec

DATA = DataSpec(name="imagenet_lt")
SEED = 5021
GENERALIST = TrainSpec(
    epochs=100, batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
    select="best", patience=15,
)  # fmt: skip
STEP_EXPERT = GENERALIST.replace(schedule="step", milestones=tuple(range(10, 100, 10)), gamma=0.1)
COSINE_EXPERT = GENERALIST.replace(epochs=60)
SPLITS = ((100, None), (20, 100), (0, 20))


def pipeline(config: dict[str, Any]) -> StageSpec:
    return cbe(
        config["seed"],
        splits=SPLITS,
        open_ratio=16.0,
        num_learnable=(-1, 2, 1),
        calibration=config["calibration"],
        routing=config.get("routing", "fused"),
        data=DATA,
        backbone="resnet10",
        generalist_train=GENERALIST,
        expert_train=(STEP_EXPERT, STEP_EXPERT, COSINE_EXPERT),
        calibration_train=CIFAR_CALIBRATION,
    )


experiment = Experiment(
    name="cbe_imagenet_lt",
    pipeline=pipeline,
    param_space={"calibration": tune.grid_search(["full", "prior", "none"])},
    search="grid",
    seeds=(SEED,),
    max_concurrent_trials=1,
    scheduler=None,
    resources=Resources(num_workers=1, cpus_per_worker=8, gpus_per_worker=1),
)
