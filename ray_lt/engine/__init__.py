"""The one training loop every stage runs, inside a Ray Train worker or in-process.

``run_stage`` (loop.py) reads as its phases: prepare the objective's data and model on the device
and the optimiser (prepare.py), restore the last checkpoint if there is one, then for each epoch
train on the sampler's draw with augmented batches and scheduled SGD (epoch.py), evaluate
(evaluation.py), select the best epoch, report and checkpoint; at the end export weights and
per-sample tables (export.py). Stage objectives (``ray_lt.objective``) supply the method.

The loop talks to its runner through a small ``Session`` (sessions.py: rank, device, report, last
checkpoint): ``RayTrainSession`` inside a ``TorchTrainer`` worker, ``LocalSession`` for benchmarks
and unit tests. Both run this same function; there is no second loop.
"""

from ray_lt.engine.epoch import lr_at, set_train_mode
from ray_lt.engine.loop import run_stage
from ray_lt.engine.prepare import StageRun
from ray_lt.engine.sessions import LocalSession, RayTrainSession, Session

_set_train_mode = set_train_mode  # the name the engine's tests use

__all__ = [
    "LocalSession",
    "RayTrainSession",
    "Session",
    "StageRun",
    "lr_at",
    "run_stage",
    "set_train_mode",
]
