"""SSD-LT on ImageNet-LT with the official code's settings, for users who have the data.

ResNeXt-50 (32x4d) from scratch in every stage. Stage I: 135 epochs, batch 256, lr 0.1, cosine
without warm-up, wd 5e-4, MLP 2048 -> 2048 -> 128, queue 115,712 (452 x 256), tau 0.2, m 0.999,
MoCo-v2 key view with Gaussian blur. Stage II: LWS, 5 epochs, batch 512, lr 0.2, cosine,
class-aware sampling (2 per class visit). Stage III: 135 epochs as stage I, T = 2, CE : KD 1 : 1.
Rows: the method with and without the final LWS fine-tune of the hard head.

The weak view is a placeholder (``crop_flip``) until the ImageNet-LT loader lands (issue 8, with
its RandomResizedCrop-224 + colour-jitter view); until then the sweep stops before any trial with
a one-line error: unknown dataset 'imagenet_lt', followed by the list of datasets that exist.

    RAY_LT_DATA=/path/with/ImageNet_LT python -m ray_lt.sweep experiments/ssd_lt_imagenet_lt.py
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.recipes.ssd_lt import REPORT_METRICS, ssd_lt
from ray_lt.spec import Resources, StageSpec, TrainSpec

DATA = DataSpec(name="imagenet_lt")
TRAIN = TrainSpec(
    epochs=135,
    batch_size=256,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=0,
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
)
QUEUE = 115_712  # 452 x 256 <= 115,846 training images


def pipeline(config: dict[str, Any]) -> StageSpec:
    return ssd_lt(
        config["seed"],
        finetune=config["finetune"],
        temperature=2.0,
        queue_size=QUEUE,
        data=DATA,
        backbone="resnext50_32x4d",
        hidden_dim=2048,
        key_augment="moco_v2_blur",
        feature_train=TRAIN,
        lws_train=LWS_TRAIN,
        distill_train=TRAIN,
    )


experiment = Experiment(
    name="ssd_lt_imagenet_lt",
    pipeline=pipeline,
    param_space={"finetune": tune.grid_search([False, True])},
    search="grid",
    seeds=(0,),
    max_concurrent_trials=1,
    scheduler=None,
    report_metrics=REPORT_METRICS,
    resources=Resources(num_workers=1, cpus_per_worker=8, gpus_per_worker=1),
)
