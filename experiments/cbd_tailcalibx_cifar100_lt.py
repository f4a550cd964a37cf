"""CBD with TailCalibX's third-party CIFAR-100-LT (IF 100) recipe, ResNet-32.

The CBD paper has no CIFAR experiments; this is the recipe the TailCalibX authors released for
it (docs/methods/cbd.md lists its sources and where ray-lt differs). Teachers: vanilla, 150
epochs, SGD 0.9, lr 0.2, batch 128, weight decay 5e-4, cosine to 0, instance sampling. Student:
from scratch with the same schedule, class-aware sampling with 4 images per class visit,
(1 - alpha) CE + alpha beta (1 - cos) with alpha 0.8 and beta 100, its classifier on a 128-d
feature (``proj_dim=128``) that is distilled through a linear adapter to the teachers' width.

Rows: ``per_seed`` is the released script (student seed s distils one teacher, of seed 10 s);
``all_three`` distils the three teachers vanilla10, vanilla20 and vanilla30 together. Each row
runs with student seeds 1, 2 and 3; the three teachers are trained once and shared.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/cbd_tailcalibx_cifar100_lt.py
    python -m ray_lt.report experiments/cbd_tailcalibx_cifar100_lt.py

The smoke variant (``--smoke``) runs both rows with ResNet-8 for one epoch per stage on small
synthetic data.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.experiment import Experiment
from ray_lt.recipes import SMOKE_DATA, SMOKE_TRAIN, TAILCALIBX_STUDENT, cbd_tailcalibx
from ray_lt.spec import StageSpec


def pipeline(config: dict[str, Any], **recipe: Any) -> StageSpec:
    return cbd_tailcalibx(config["seed"], teachers=config["teachers"], **recipe)


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    """One epoch of ResNet-8 per stage on small synthetic data, the same sampler as in full."""
    train = SMOKE_TRAIN.replace(epochs=1, eval_every=1)
    student = train.replace(
        sampler=TAILCALIBX_STUDENT.sampler, sampler_params=TAILCALIBX_STUDENT.sampler_params
    )
    return pipeline(
        config, data=SMOKE_DATA, teacher_train=train, student_train=student, backbone="resnet8"
    )


experiment = Experiment(
    name="cbd_tailcalibx_cifar100_lt",
    pipeline=pipeline,
    param_space={"teachers": tune.grid_search(["per_seed", "all_three"])},
    search="grid",
    seeds=(1, 2, 3),
    max_concurrent_trials=3,
    scheduler=None,
    baseline={"teachers": "per_seed"},
    smoke=dict(pipeline=smoke_pipeline, seeds=(1,), max_concurrent_trials=2),
)
