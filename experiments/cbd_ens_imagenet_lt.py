"""CBD_ENS on ImageNet-LT with the paper's settings, for users who have the data.

ResNet-50, 90 epochs, batch 128, lr 0.05 (0.1 per 256 images), cosine decay without warm-up,
weight decay 5e-4 on every parameter, cosine heads with a fixed scale of 20, and four teachers
(vanilla and data_aug, seeds 1 and 2). Until the ImageNet-LT loader lands (streamed through Ray
Data), the sweep stops before any trial with a one-line error: unknown dataset 'imagenet_lt',
followed by the list of datasets that exist.

    RAY_LT_DATA=/path/with/ImageNet_LT python -m ray_lt.sweep experiments/cbd_ens_imagenet_lt.py
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.recipes import cbd
from ray_lt.spec import Resources, StageSpec, TrainSpec

DATA = DataSpec(name="imagenet_lt")
TRAIN = TrainSpec(
    epochs=90,
    batch_size=128,
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=0,
    eval_every=5,
)


def pipeline(config: dict[str, Any]) -> StageSpec:
    return cbd(
        config["teachers"],
        config["seed"],
        alpha=0.4,
        beta=100.0,
        data=DATA,
        teacher_train=TRAIN,
        student_train=TRAIN.replace(sampler="class_balanced"),
        backbone="resnet50",
        scale=20.0,
    )


experiment = Experiment(
    name="cbd_ens_imagenet_lt",
    pipeline=pipeline,
    param_space={
        "teachers": tune.grid_search(["vanilla1", "vanilla1+vanilla2+data_aug1+data_aug2"])
    },
    search="grid",
    seeds=(1,),
    max_concurrent_trials=2,
    scheduler=None,
    resources=Resources(num_workers=1, cpus_per_worker=8, gpus_per_worker=1),
)
