"""Quickstart: CE -> cRT on the built-in synthetic long-tailed data, on a laptop CPU.

Optuna (TPE) searches the cRT stage's learning rate and weight decay; every configuration runs
with two seeds. The CE stage depends only on the seed, so all configurations of one seed share
one trained CE artifact: watch the store train it once and reuse it.

    python -m ray_lt.sweep experiments/quickstart.py
    python -m ray_lt.report experiments/quickstart.py
"""

from __future__ import annotations

from typing import Any

from ray_lt.data.spec import DataSpec
from ray_lt.experiment import Experiment
from ray_lt.spec import StageSpec, TrainSpec
from search_spaces.optim import lr_wd

DATA = DataSpec(name="synthetic_lt", num_classes=10, max_per_class=200, imbalance=20.0)


def pipeline(config: dict[str, Any], epochs: int = 12, crt_epochs: int = 3) -> StageSpec:
    """CE features (seeded) -> cRT classifier with the trial's lr / weight decay.

    ResNet-8 (the CIFAR family's smallest member) keeps a CPU run to minutes; swap in
    "resnet32" for the literature's CIFAR backbone.
    """
    ce = StageSpec(
        kind="ce",
        data=DATA,
        train=TrainSpec(
            epochs=epochs,
            batch_size=32,
            lr=0.05,
            warmup_epochs=1,
            schedule="cosine",
            seed=config["seed"],
            eval_every=4,
        ),
        params={"backbone": "resnet8"},
    )
    return StageSpec(
        kind="crt",
        data=DATA,
        train=TrainSpec(
            epochs=crt_epochs,
            batch_size=32,
            lr=config["lr"],
            weight_decay=config["weight_decay"],
            schedule="cosine",
            sampler="class_balanced",
            seed=config["seed"],
        ),
        inputs={"features": ce},
    )


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return pipeline(config, epochs=2, crt_epochs=1)


experiment = Experiment(
    name="quickstart",
    pipeline=pipeline,
    param_space=lr_wd(),
    metric="val_overall",
    mode="max",
    search="optuna",
    seeds=(0, 1),
    num_samples=2,
    max_concurrent_trials=2,
    smoke=dict(pipeline=smoke_pipeline, seeds=(0,)),
)
