"""SSD-LT on iNaturalist 2018, for users who have the data.

The released code covers ImageNet-LT only (docs/methods/ssd_lt.md); iNat18 settings follow the
usual convention and are unverified: ResNet-50 from scratch in every stage, the ImageNet-LT stage
settings (135 epochs, batch 256, lr 0.1, cosine, wd 5e-4, T = 2, CE : KD 1 : 1), the MoCo queue
the largest multiple of 256 below the 437,513 training images, the weak view
``rrc_flip_jitter``. The test split is the official val2018 set; iNat18 has no validation split.
BatchNorm of the frozen networks as in the official ImageNet-LT code (``bn="official"``: the LWS
stages re-estimate the frozen encoder's statistics, stage III's teacher runs in train mode).
ray-lt's own setting (``bn="frozen"``) is one more stage III on 437k images, so it is not a row
here: add "frozen" to ``BN_MODES`` to run it too (the ImageNet-LT file measures the difference).

    RAY_LT_DATA=/data python -m ray_lt.sweep experiments/ssd_lt_inat18.py
    # /data/iNat18/{train2018,val2018}.json with train_val2018/ beside them

The smoke variant (``--smoke``) runs the pipeline with ResNet-50 on a tiny tree in the iNat18
format at 32 px, inline on a CPU.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.recipes.large import GPU_STAGE, SMOKE_RESOURCES, smoke_data, ssd_lt_large
from ray_lt.recipes.ssd_lt import REPORT_METRICS
from ray_lt.spec import StageSpec, TrainSpec

# iNat18 has no validation split: trials report the test split (a grid, nothing is selected by it)
METRIC = "overall"

DATA = DataSpec(name="inat18")
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
LWS_TRAIN = TRAIN.replace(
    epochs=5, batch_size=512, lr=0.2, sampler="class_aware", sampler_params={"k": 2}
)
QUEUE = 437_504  # 1709 x 256 <= 437,513 training images
BN_MODES = ["official"]  # add "frozen" for ray-lt's eval-mode BatchNorms as a second row


def pipeline(config: dict[str, Any]) -> StageSpec:
    return ssd_lt_large(
        config,
        data=DATA,
        backbone="resnet50",
        train=TRAIN,
        lws_train=LWS_TRAIN,
        queue_size=QUEUE,
        bn=config.get("bn", "official"),
    )


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return ssd_lt_large(config, data=smoke_data("inat18"), backbone="resnet50")


experiment = Experiment(
    name="ssd_lt_inat18",
    pipeline=pipeline,
    param_space={
        "finetune": tune.grid_search([False, True]),
        "bn": tune.grid_search(BN_MODES),
    },
    search="grid",
    metric=METRIC,
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
