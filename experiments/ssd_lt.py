"""SSD-LT on CIFAR-100-LT (IF 100), ResNet-32: the method's ablations, seeds 0, 1 and 2.

Stage I trains CE on the weak view plus a label-masked MoCo loss on a MoCo-v2 view (tau 0.2,
m 0.999, 128-d embedding, queue 10,752); stage II learns LWS scales on the frozen stage-I model
with class-aware sampling (2 per class visit); stage III trains a fresh ResNet-32 with a hard head
(CE) and a soft head (KD from the stage-II teacher, T = 2). Recipe: ray_lt/recipes/ssd_lt.py.

Rows (each x 3 seeds; stages shared between rows are trained once):
  ssd                the full method (CE + SSL, masked negatives, LWS teacher, KD 1, T 2)
  ce_only            stage I without SSL (lambda = 0)
  plain_negatives    stage I with MoCo's unmasked negatives
  plain_teacher      stage III distils stage I as is (no LWS)
  kd_off             stage III without KD (no teacher, no soft head: soft columns show a dash)
  t1, t4             KD temperature 1 and 4
  ssd_finetune       the full method + LWS on the stage-III hard head (final stage: hard only)
Columns: many / medium / few / overall of the hard head and soft_* of the soft head.

    RAY_LT_DATA=/path/to/data python -m ray_lt.sweep experiments/ssd_lt.py
    python -m ray_lt.report experiments/ssd_lt.py
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ray_lt.experiment import Experiment
from ray_lt.recipes.ssd_lt import REPORT_METRICS, ssd_lt, ssd_lt_smoke
from ray_lt.spec import StageSpec

VARIANTS = [
    {"row": "ssd"},
    {"row": "ce_only", "ssl_weight": 0.0},
    {"row": "plain_negatives", "mask_labels": False},
    {"row": "plain_teacher", "teacher": "plain"},
    {"row": "kd_off", "kd_weight": 0.0},
    {"row": "t1", "temperature": 1.0},
    {"row": "t4", "temperature": 4.0},
    {"row": "ssd_finetune", "finetune": True},
]
SMOKE_VARIANTS = [
    {"row": "ssd"},
    {"row": "plain_teacher", "teacher": "plain"},
    {"row": "ssd_finetune", "finetune": True},
]


def _options(variant: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in variant.items() if k != "row"}


def pipeline(config: dict[str, Any]) -> StageSpec:
    """One ablation row with one seed."""
    return ssd_lt(config["seed"], **_options(config["variant"]))


def smoke_pipeline(config: dict[str, Any]) -> StageSpec:
    return ssd_lt_smoke(config["seed"], **_options(config["variant"]))


experiment = Experiment(
    name="ssd_lt",
    pipeline=pipeline,
    param_space={"variant": tune.grid_search(VARIANTS)},
    search="grid",
    seeds=(0, 1, 2),
    max_concurrent_trials=4,
    scheduler=None,
    report_metrics=REPORT_METRICS,
    smoke=dict(
        pipeline=smoke_pipeline,
        param_space={"variant": tune.grid_search(SMOKE_VARIANTS)},
        seeds=(0,),
        max_concurrent_trials=2,
    ),
)
