"""CBE on CIFAR-100-LT (IF 100): a Pareto search of overall against few-shot accuracy.

Where to split the classes among the experts and how large each expert's open set is trade the
head against the tail: a low few-shot threshold gives the few-shot expert fewer, rarer classes;
a large open ratio makes an expert more willing to say "not mine". Rather than pick one weighting
of the two, this sweep searches the expert split thresholds and the open ratio of every expert
with Optuna's multi-objective TPE on (val_overall, val_few), both maximised, and
``MultiObjectiveASHA`` stops configurations whose calibration epochs are dominated at a rung
(docs/pareto.md). The generalist is shared by every trial and an expert is trained once per
(split, open ratio), then reused from the store.

One seed: the scheduler stops whole configurations only when each runs once (with more seeds it
would stop single seeds, so the sweep switches it off). Rerun the Pareto-optimal configurations
with seeds 0, 1, 2 through experiments/cbe.py-style rows for the tables.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/pareto_cbe.py
    python -m ray_lt.sweep experiments/pareto_cbe.py --smoke   # minutes on 2 CPU cores
"""

from __future__ import annotations

from typing import Any

from ray_lt.experiment import Experiment
from ray_lt.recipes.cbe import cbe_from_config
from ray_lt.spec import Resources, StageSpec
from search_spaces.cbe import open_ratio, thresholds

SEARCHED = ("thresholds", "open_ratio_0", "open_ratio_1", "open_ratio_2")
# The smoke data's train counts are 100 71 51 36 26 18 13 9 6 5: thresholds that give every
# expert at least three classes there (the CIFAR thresholds would leave one class above 100).
SMOKE_THRESHOLDS = ("15,50", "10,40", "15", "50")


def pipeline(config: dict[str, Any], *, smoke: bool = False) -> StageSpec:
    """A calibrated expert ensemble with the sampled thresholds and open ratios."""
    settings = {k: config[k] for k in SEARCHED if k in config}
    return cbe_from_config({**settings, "seed": config["seed"]}, smoke=smoke)


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return pipeline(config, smoke=True)


experiment = Experiment(
    name="pareto_cbe",
    pipeline=pipeline,
    param_space={**thresholds(), **open_ratio()},
    metric=("val_overall", "val_few"),
    mode=("max", "max"),
    search="optuna",
    seeds=(0,),
    num_samples=24,
    max_concurrent_trials=4,
    scheduler="asha",
    grace_period=10,  # calibration epochs before a first rung (then 20, 40, 80, 160)
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={**thresholds(SMOKE_THRESHOLDS), **open_ratio((4.0, 16.0))},
        num_samples=4,  # three to meet at a rung (Optuna's first ten are random)
        max_concurrent_trials=2,
        grace_period=1,  # rungs at calibration epochs 1, 2 and 4 of 5
        resources=Resources(num_workers=0, cpus_per_worker=1),  # inline: no worker-group start
    ),
)
