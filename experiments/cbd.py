"""CBD with one vanilla teacher on CIFAR-100-LT (IF 100), ResNet-32, with and without distillation.

One teacher (vanilla, seed 1; CE recipe, cosine head) and a student trained from scratch with
class-balanced sampling that distils its feature. The rows are alpha = 0 (no distillation) and
alpha = 0.4, each with seeds 0, 1 and 2. The teacher is trained once.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/cbd.py
    python -m ray_lt.report experiments/cbd.py
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.experiment import Experiment
from ray_lt.recipes import SMOKE_DATA, SMOKE_TRAIN, cbd
from ray_lt.spec import StageSpec


def pipeline(config: dict[str, Any], **recipe: Any) -> StageSpec:
    return cbd("vanilla1", config["seed"], alpha=config["alpha"], **recipe)


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return pipeline(
        config,
        data=SMOKE_DATA,
        teacher_train=SMOKE_TRAIN,
        student_train=SMOKE_TRAIN.replace(sampler="class_balanced"),
        backbone="resnet8",
    )


experiment = Experiment(
    name="cbd",
    pipeline=pipeline,
    param_space={"alpha": tune.grid_search([0.0, 0.4])},
    search="grid",
    seeds=(0, 1, 2),
    max_concurrent_trials=4,
    scheduler=None,
    smoke=dict(pipeline=smoke_pipeline, seeds=(0,), max_concurrent_trials=2),
)
