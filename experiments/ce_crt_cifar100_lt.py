"""CE, cRT and LWS on CIFAR-100-LT (imbalance 100), ResNet-32, the literature's CIFAR recipe.

CE: SGD momentum 0.9, lr 0.1, batch 128, weight decay 2e-4, 200 epochs, 5-epoch linear warm-up,
lr x0.01 at epoch 160 and x0.0001 at 180 (LDAM-DRW's schedule). cRT / LWS: the CE stage's frozen
features, class-balanced sampling, 10 epochs, lr 0.1 with a cosine schedule
(ray_lt/recipes/__init__.py). The grid runs each method with three seeds; cRT and LWS reuse the
CE stage of their seed, so CE trains 3 times, not 9.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/ce_crt_cifar100_lt.py
    python -m ray_lt.report experiments/ce_crt_cifar100_lt.py

Literature (docs/methods/baselines.md): CE 38.3, cRT about 43.3 overall.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.experiment import Experiment
from ray_lt.recipes import baseline, smoke_baseline
from ray_lt.spec import StageSpec


def pipeline(config: dict[str, Any]) -> StageSpec:
    return baseline(config["method"], config["seed"])


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    """One epoch of each stage with ResNet-8 on the real CIFAR-100-LT: the real data path."""
    return smoke_baseline(config["method"], config["seed"])


experiment = Experiment(
    name="ce_crt_cifar100_lt",
    pipeline=pipeline,
    param_space={"method": tune.grid_search(["ce", "crt", "lws"])},
    search="grid",
    seeds=(0, 1, 2),
    max_concurrent_trials=4,
    scheduler=None,
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={"method": tune.grid_search(["ce", "crt"])},
        seeds=(0,),
        max_concurrent_trials=2,
    ),
)
