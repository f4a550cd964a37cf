"""CBE ablations on CIFAR-100-LT (IF 100), ResNet-32: what the open class and the generalist add.

The recipe is experiments/cbe.py's (ray_lt/recipes/cbe.py has it and why): the CE generalist,
experts many [100, inf) / medium [20, 100) / few [0, 20) with open ratio 16 and num_learnable
-1 / 2 / 1, joint calibration on the validation split's logits. Rows:

- "experts+calibration": the method as it is (every report row is t-tested against it);
- "no open class": experts without the open (reject) output, trained on their own classes only
  (``open_class=False``); the calibration then has no open slot and no prior offset to apply;
- "extended ensemble": the generalist's logits as one more calibrated member of the ensemble
  (``include_generalist=True``): its per-logit scale and bias are learnt with the experts', and
  its softmax multiplies into the fused prediction;
- "no open class, extended": both;
- "frozen BN re-estimated": the original code's BatchNorms in the experts' frozen parts, which
  re-estimate their statistics on the expert's data (``update_frozen_bn=True``; the medium and
  few experts change, the many expert trains everything and is shared);
- "generalist": the CE generalist alone.

Seeds 1, 2 and 3. Rows share every stage their settings do not change (the generalist always,
the many expert across most rows), and "experts+calibration" shares its stages with
experiments/cbe.py's seeds 1 and 2.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/cbe_ablations.py
    python -m ray_lt.report experiments/cbe_ablations.py

The smoke variant (``--smoke``) runs four rows on the CIFAR smoke subset with ResNet-8.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.experiment import Experiment
from ray_lt.recipes.cbe import cbe_from_config, generalist
from ray_lt.spec import StageSpec

# row name -> settings (keys of ``cbe_from_config``); None: the generalist alone
ROWS: dict[str, dict[str, Any] | None] = {
    "experts+calibration": {},
    "no open class": {"open_class": False},
    "extended ensemble": {"include_generalist": True},
    "no open class, extended": {"open_class": False, "include_generalist": True},
    "frozen BN re-estimated": {"update_frozen_bn": True},
    "generalist": None,
}
SMOKE_ROWS = ("experts+calibration", "no open class", "extended ensemble", "generalist")


def pipeline(config: dict[str, Any], *, smoke: bool = False) -> StageSpec:
    """The generalist, or a calibrated expert ensemble with the row's settings."""
    row = ROWS[config["row"]]
    if row is None:
        return generalist(config["seed"], smoke=smoke)
    return cbe_from_config({**row, "seed": config["seed"]}, smoke=smoke)


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return pipeline(config, smoke=True)


experiment = Experiment(
    name="cbe_ablations",
    pipeline=pipeline,
    param_space={"row": tune.grid_search(list(ROWS))},
    search="grid",
    seeds=(1, 2, 3),
    max_concurrent_trials=4,
    scheduler=None,
    baseline={"row": "experts+calibration"},
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={"row": tune.grid_search(list(SMOKE_ROWS))},
        seeds=(0,),
        max_concurrent_trials=2,
    ),
)
