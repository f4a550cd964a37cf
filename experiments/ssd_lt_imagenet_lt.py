"""SSD-LT on ImageNet-LT with the official code's settings, for users who have the data.

ResNeXt-50 (32x4d) from scratch in every stage. Stage I: 135 epochs, batch 256, lr 0.1, cosine
without warm-up, wd 5e-4, MLP 2048 -> 2048 -> 128, queue 115,712 (452 x 256), tau 0.2, m 0.999,
MoCo-v2 key view with Gaussian blur. Stage II: LWS, 5 epochs, batch 512, lr 0.2, cosine,
class-aware sampling (2 per class visit). Stage III: 135 epochs as stage I, T = 2, CE : KD 1 : 1.
BatchNorm of the frozen networks as in the official code (``bn="official"``): stage II and the
fine-tune re-estimate the frozen encoder's running statistics on their class-balanced batches,
and stage III's teacher runs in train mode (batch statistics).
Rows: the method with and without the final LWS fine-tune of the hard head, each with
``bn="official"`` and with ray-lt's ``bn="frozen"`` (eval statistics everywhere, its CIFAR
default). The second setting costs one more stage III (plus two 5-epoch LWS stages): stage
I does not depend on it and is trained once; a trial without the fine-tune reuses the stage III
of the trial with it.

The weak view is RandomResizedCrop 224 + flip + ColorJitter(0.4, 0.4, 0.4) (``rrc_flip_jitter``).
ImageNet-LT at 224 px streams through Ray Data: the CPU decoder takes the random resized crop from
the full JPEG and the device applies the jitter; the MoCo key view is then drawn on the device from
that crop (a crop of a crop, where the original draws both views from the full image).

    RAY_LT_DATA=/data python -m ray_lt.sweep experiments/ssd_lt_imagenet_lt.py
    # /data/ImageNet_LT/ImageNet_LT_{train,val,test}.txt with the ImageNet train/ and val/ beside

The smoke variant (``--smoke``) runs the pipeline with ResNeXt-50 on a tiny tree in the same format
at 32 px, inline on a CPU, with a small queue and the blur-free key view.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.recipes.large import GPU_STAGE, SMOKE_RESOURCES, smoke_data, ssd_lt_large
from ray_lt.recipes.ssd_lt import REPORT_METRICS
from ray_lt.spec import StageSpec, TrainSpec

DATA = DataSpec(name="imagenet_lt")
TRAIN = TrainSpec(
    epochs=135,
    batch_size=256,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=0,
    augment="rrc_flip_jitter",
    eval_every=5,
)
LWS_TRAIN = TrainSpec(
    epochs=5,
    batch_size=512,
    lr=0.2,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    sampler="class_aware",
    sampler_params={"k": 2},
    augment="rrc_flip_jitter",
)
QUEUE = 115_712  # 452 x 256 <= 115,846 training images


def pipeline(config: dict[str, Any]) -> StageSpec:
    return ssd_lt_large(
        config,
        data=DATA,
        backbone="resnext50_32x4d",
        train=TRAIN,
        lws_train=LWS_TRAIN,
        queue_size=QUEUE,
        bn=config.get("bn", "official"),
    )


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return ssd_lt_large(config, data=smoke_data("imagenet_lt"), backbone="resnext50_32x4d")


experiment = Experiment(
    name="ssd_lt_imagenet_lt",
    pipeline=pipeline,
    param_space={
        "finetune": tune.grid_search([False, True]),
        "bn": tune.grid_search(["official", "frozen"]),
    },
    search="grid",
    seeds=(0,),
    max_concurrent_trials=1,
    scheduler=None,
    report_metrics=REPORT_METRICS,
    resources=GPU_STAGE,
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={"finetune": tune.grid_search([False])},
        resources=SMOKE_RESOURCES,
    ),
)
