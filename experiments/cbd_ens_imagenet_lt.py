"""CBD_ENS on ImageNet-LT with the paper's settings, for users who have the data.

ResNet-50, 90 epochs, batch 128, lr 0.05 (0.1 per 256 images), cosine decay without warm-up,
weight decay on every parameter (the official 5e-4 is torch's 2.5e-4: the TF code's penalty has
gradient wd/2 x theta, docs/methods/cbd.md), cosine heads with a fixed scale of 20, the last
BatchNorm of every residual block starting at zero, and four teachers (vanilla and data_aug,
seeds 1 and 2; data_aug adds SimCLR-v2 colour distortion to the same crop). Training images get
the official crop: RandomResizedCrop over 5-100% of the area to 224 + flip (``rrc05_flip``,
taken from the full JPEG when streamed), evaluation Resize 256 + CentreCrop 224. At 224 px
ImageNet-LT streams through Ray Data (``DataSpec.placement="auto"``): JPEGs are decoded and
cropped on CPU workers across the cluster.

    RAY_LT_DATA=/data python -m ray_lt.sweep experiments/cbd_ens_imagenet_lt.py
    # /data/ImageNet_LT/ImageNet_LT_{train,val,test}.txt with the ImageNet train/ and val/ beside

The smoke variant (``--smoke``) runs the same pipeline with ResNet-50 on a tiny tree in the same
format at 32 px, with the same crop, inline on a CPU (``tests/image_trees.py`` makes one).
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.recipes.large import GPU_STAGE, SMOKE_RESOURCES, SMOKE_TRAIN, cbd_ens, smoke_data
from ray_lt.spec import StageSpec, TrainSpec

DATA = DataSpec(name="imagenet_lt")
TRAIN = TrainSpec(
    epochs=90,
    batch_size=128,
    lr=0.05,
    momentum=0.9,
    weight_decay=2.5e-4,  # the official wd 5e-4 / 2 (see the docstring)
    schedule="cosine",
    warmup_epochs=0,
    augment="rrc05_flip",  # CBD's crop: 5-100 % of the area
    eval_every=5,
)


def pipeline(config: dict[str, Any]) -> StageSpec:
    return cbd_ens(config, data=DATA, train=TRAIN)


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    train = SMOKE_TRAIN.replace(augment=TRAIN.augment)
    return cbd_ens(config, data=smoke_data("imagenet_lt"), train=train)


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
    resources=GPU_STAGE,
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={"teachers": tune.grid_search(["vanilla1", "vanilla1+data_aug1"])},
        max_concurrent_trials=1,
        resources=SMOKE_RESOURCES,
    ),
)
