"""CBD_ENS on CIFAR-100-LT (IF 100), ResNet-32: the paper's ablations beside CE and cRT.

Teachers follow the CE recipe with a cosine head (fixed scale 16). There are four of them:
vanilla seeds 1 and 2, and data_aug seeds 1 and 2 (SimCLR colour jitter + greyscale). Each is
trained once and shared by every student that names it. Students train from scratch with
class-balanced sampling and distil the concatenated, renormalised teacher features:
(1 - alpha) * CE + alpha * beta * (1 - cos), with alpha 0.4 and beta 100.

Rows: CE, cRT, class-balanced from scratch (alpha = 0, no distillation), every non-empty subset
of the four teachers at alpha 0.4 (1 vanilla, 2 vanilla and all four among them), and alpha 0.2 /
0.6 with all four teachers. Each row runs with seeds 0, 1 and 2.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/cbd_ens.py
    python -m ray_lt.report experiments/cbd_ens.py
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.experiment import Experiment
from ray_lt.recipes import BASELINES, SMOKE_DATA, SMOKE_TRAIN, baseline, cbd
from ray_lt.spec import StageSpec
from search_spaces.cbd import teacher_subsets

ALL_FOUR = "vanilla1+vanilla2+data_aug1+data_aug2"
VARIANTS = [
    {"method": "ce"},
    {"method": "crt"},
    {"method": "cbd", "teachers": "", "alpha": 0.0},
    *({"method": "cbd", "teachers": s, "alpha": 0.4} for s in teacher_subsets()),
    {"method": "cbd", "teachers": ALL_FOUR, "alpha": 0.2},
    {"method": "cbd", "teachers": ALL_FOUR, "alpha": 0.6},
]


def pipeline(config: dict[str, Any], **recipe: Any) -> StageSpec:
    """A baseline, or a CBD student over ``variant['teachers']``."""
    variant, seed = config["variant"], config["seed"]
    if variant["method"] in BASELINES:
        keep = {k: v for k, v in recipe.items() if k in ("data", "backbone")}
        if "teacher_train" in recipe:
            keep["ce_train"] = recipe["teacher_train"]
        return baseline(variant["method"], seed, **keep)
    return cbd(variant["teachers"], seed, alpha=variant["alpha"], **recipe)


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return pipeline(
        config,
        data=SMOKE_DATA,
        teacher_train=SMOKE_TRAIN,
        student_train=SMOKE_TRAIN.replace(sampler="class_balanced"),
        backbone="resnet8",
    )


experiment = Experiment(
    name="cbd_ens",
    pipeline=pipeline,
    param_space={"variant": tune.grid_search(VARIANTS)},
    search="grid",
    seeds=(0, 1, 2),
    max_concurrent_trials=4,
    scheduler=None,
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={
            "variant": tune.grid_search(
                [
                    {"method": "ce"},
                    {"method": "cbd", "teachers": "", "alpha": 0.0},
                    {"method": "cbd", "teachers": "vanilla1", "alpha": 0.4},
                    {"method": "cbd", "teachers": "vanilla1+data_aug1", "alpha": 0.4},
                ]
            )
        },
        seeds=(0,),
        max_concurrent_trials=2,
    ),
)
