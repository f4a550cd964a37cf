"""CBE (class-balanced experts) on CIFAR-100-LT (IF 100), ResNet-32: the paper's ablations.

Generalist: the CE baseline stage (CE recipe, shared by key with every other CE row). Experts
many [100, inf) / medium [20, 100) / few [0, 20), each with an open class (ratio 16),
fine-tuned from the generalist (lr 0.01 cosine, <= 100 epochs, patience 15 on the expert's val
split), num_learnable -1 / 2 / 1. Joint calibration on the validation split's logits
(ray_lt/recipes/cbe.py has the recipe and why).

Rows: the generalist; experts + calibration; prior offset only; no calibration; the oracle
(each test image scored by its true split's expert); open ratio 4 / 8 / 32; num_learnable
all -1 and all 1; thresholds 20/50 and 10/100; two experts split at 20 or at 100. Each row runs
with seeds 0, 1 and 2; experts whose settings a row does not change are reused from the store.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/cbe.py
    python -m ray_lt.report experiments/cbe.py
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.experiment import Experiment
from ray_lt.recipes.cbe import cbe_from_config, generalist
from ray_lt.spec import StageSpec

# row name -> settings (keys of search_spaces/cbe.py); None: the generalist alone
ROWS: dict[str, dict[str, Any] | None] = {
    "generalist": None,
    "experts+calibration": {},
    "prior offset only": {"calibration": "prior"},
    "no calibration": {"calibration": "none"},
    "oracle": {"calibration": "none", "routing": "oracle"},
    "open ratio 4": {f"open_ratio_{k}": 4.0 for k in range(3)},
    "open ratio 8": {f"open_ratio_{k}": 8.0 for k in range(3)},
    "open ratio 32": {f"open_ratio_{k}": 32.0 for k in range(3)},
    "num_learnable -1/-1/-1": {f"num_learnable_{k}": -1 for k in range(3)},
    "num_learnable 1/1/1": {f"num_learnable_{k}": 1 for k in range(3)},
    "thresholds 20/50": {"thresholds": "20,50"},
    "thresholds 10/100": {"thresholds": "10,100"},
    "2 experts at 20": {"thresholds": "20"},
    "2 experts at 100": {"thresholds": "100"},
}
SMOKE_ROWS = ("generalist", "experts+calibration", "prior offset only", "oracle")


def pipeline(config: dict[str, Any], *, smoke: bool = False) -> StageSpec:
    """The generalist, or a calibrated expert ensemble with the row's settings."""
    row = ROWS[config["row"]]
    if row is None:
        return generalist(config["seed"], smoke=smoke)
    return cbe_from_config({**row, "seed": config["seed"]}, smoke=smoke)


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return pipeline(config, smoke=True)


experiment = Experiment(
    name="cbe",
    pipeline=pipeline,
    param_space={"row": tune.grid_search(list(ROWS))},
    search="grid",
    seeds=(0, 1, 2),
    max_concurrent_trials=4,
    scheduler=None,
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={"row": tune.grid_search(list(SMOKE_ROWS))},
        seeds=(0,),
        max_concurrent_trials=2,
    ),
)
