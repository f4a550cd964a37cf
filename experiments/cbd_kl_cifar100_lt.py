"""CBD_ENS on CIFAR-100-LT (IF 100): feature distillation (CBD's) against logit distillation.

Both rows use the four standard teachers (vanilla and data_aug, seeds 1 and 2; ray-lt's CIFAR
teacher recipe, trained once and shared with experiments/cbd_ens.py) and the same student:
ResNet-32 from scratch, class-balanced sampling, a projection to 4 x 64 and a fixed-scale cosine
classifier. Only the distillation term differs:

- ``feature``: (1 - alpha) CE + alpha beta (1 - cos(student feature, teachers' features)),
  alpha 0.4, beta 100 (the official loss);
- ``logit``: (1 - alpha) CE + alpha KL(softmax(mean teacher logits / T) || softmax(student
  logits / T)) T^2, alpha 0.4, T 4 (Hinton et al.; docs/methods/cbd.md says why T = 4).

Each row runs with seeds 1, 2 and 3; the report t-tests the logit row against the feature row.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/cbd_kl_cifar100_lt.py
    python -m ray_lt.report experiments/cbd_kl_cifar100_lt.py

The smoke variant (``--smoke``) trains two ResNet-8 teachers and the students for one epoch each
on small synthetic data.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.experiment import Experiment
from ray_lt.recipes import SMOKE_DATA, SMOKE_TRAIN, cbd
from ray_lt.spec import StageSpec

ALL_FOUR = "vanilla1+vanilla2+data_aug1+data_aug2"


def pipeline(config: dict[str, Any], teachers: str = ALL_FOUR, **recipe: Any) -> StageSpec:
    return cbd(teachers, config["seed"], alpha=0.4, distill=config["distill"], **recipe)


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    """One epoch of ResNet-8 per stage, two teachers, on small synthetic data."""
    train = SMOKE_TRAIN.replace(epochs=1, eval_every=1)
    return pipeline(
        config,
        teachers="vanilla1+data_aug1",
        data=SMOKE_DATA,
        teacher_train=train,
        student_train=train.replace(sampler="class_balanced"),
        backbone="resnet8",
    )


experiment = Experiment(
    name="cbd_kl_cifar100_lt",
    pipeline=pipeline,
    param_space={"distill": tune.grid_search(["feature", "logit"])},
    search="grid",
    seeds=(1, 2, 3),
    max_concurrent_trials=4,
    scheduler=None,
    baseline={"distill": "feature"},
    smoke=dict(pipeline=smoke_pipeline, seeds=(1,), max_concurrent_trials=2),
)
