"""CE and τ-norm on CIFAR-100-LT (imbalance 100), ResNet-32, the literature's CIFAR recipe.

CE: SGD momentum 0.9, lr 0.1, batch 128, weight decay 2e-4, 200 epochs, 5-epoch linear warm-up,
lr x0.01 at epoch 160 and x0.0001 at 180 (LDAM-DRW's schedule). τ-norm (Kang et al.,
"Decoupling representation and classifier", ICLR 2020): post-hoc on the CE stage of the same
seed, nothing trains; each classifier row w_i becomes w_i / ||w_i||^τ (no bias), τ chosen on the
validation split from 0.0, 0.1, ..., 1.0 and reported on test (ray_lt/stages/tau_norm.py). The
grid runs both methods with three seeds; τ-norm reuses its seed's CE stage (the same key as in
experiments/ce_crt_cifar100_lt.py), so CE trains 3 times, not 6, and a store that holds that
experiment's CE stages reuses them.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/tau_norm_cifar100_lt.py
    python -m ray_lt.report experiments/tau_norm_cifar100_lt.py

Literature (docs/methods/baselines.md): CE 38.3 overall; published τ-norm figures for
CIFAR-100-LT IF100 vary by source (the paper's tables are ImageNet-LT, Places-LT and
iNaturalist 2018), so compare with our own CE and cRT runs first.
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
    name="tau_norm_cifar100_lt",
    pipeline=pipeline,
    param_space={"method": tune.grid_search(["ce", "tau_norm"])},
    search="grid",
    seeds=(0, 1, 2),
    max_concurrent_trials=4,
    scheduler=None,
    baseline={"method": "ce"},
    smoke=dict(
        pipeline=smoke_pipeline,
        seeds=(0,),
        max_concurrent_trials=2,
    ),
)
