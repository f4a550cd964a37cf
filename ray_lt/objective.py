"""What a stage objective is: the few method-specific pieces the engine plugs in.

A stage objective builds the model (possibly from upstream artifacts), computes the named loss
terms of one batch and says how to predict. The engine owns everything else: epochs, optimiser,
schedule, mixed precision, DDP, evaluation, reports, checkpoints and exports. There are no hooks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ray_lt.data.spec import LTDataset
from ray_lt.registry import Registry
from ray_lt.spec import StageSpec, from_mapping


@dataclass
class UpstreamArtifact:
    """An upstream stage's output as a worker sees it: its spec, weights and tables."""

    key: str
    spec: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(
        default_factory=dict
    )  # name -> pyarrow.Table (tables/*.parquet)


@dataclass
class StageContext:
    """Everything an objective may read besides its own parameters."""

    spec: StageSpec
    data: LTDataset
    device: torch.device
    inputs: Mapping[str, UpstreamArtifact]
    class_counts: torch.Tensor  # train images per class, on ``device``
    # Frozen helpers an objective builds beside its model (e.g. distillation teachers): they are
    # on ``device`` in eval mode, never optimised and never saved with the stage's weights.
    aux: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes


@dataclass
class Batch:
    """One training batch, already augmented and on the device."""

    x: torch.Tensor  # float, normalised, [B, 3, H, W]
    y: torch.Tensor  # int64 [B]
    index: torch.Tensor  # int64 [B]: rows of the train split
    raw: torch.Tensor  # uint8 [B, 3, H, W] before augmentation (for objectives with other views)
    generator: torch.Generator  # the stage's augmentation generator, for extra views


class Objective(Protocol):
    """A registered stage kind. ``version`` enters the stage key: bump it when results change.

    Optional members, each used by the engine or the sweep when present:

    - ``validate(params, spec)``: cheap checks the sweep runs on the driver before any trial.
    - ``predict(params, model, x)``: evaluation outputs other than ``model(x)``; it may return
      ``(features, logits, extras)`` where ``extras`` maps a name to a ``[N, ...]`` tensor,
      exported as a table column; ``logits_<head>`` extras are scored as ``<head>_overall``...
    - ``prepare_data(params, data, inputs) -> LTDataset``: the view of the dataset the stage
      trains and evaluates on (a class subset with new labels, or float rows of upstream logits).
    - ``export_tables(params, model, ctx) -> dict[str, pyarrow.Table]``: extra artifact tables.
    - ``in_trial = True``: a cheap CPU stage run in the trial's process, not a Ray Train fit.
    """

    version: ClassVar[str]
    Params: ClassVar[type]

    def build(self, params: Any, ctx: StageContext) -> nn.Module:
        """The model to train, returning (features, logits); frozen parts have grads off."""
        ...

    def loss(
        self, params: Any, model: nn.Module, batch: Batch, ctx: StageContext
    ) -> dict[str, torch.Tensor]:
        """Named loss terms of one batch; the engine sums them and logs each."""
        ...


OBJECTIVES: Registry[Objective] = Registry("stage kind")


def get_objective(kind: str) -> Objective:
    """The objective registered as ``kind``; importing ``ray_lt.stages`` registers them all.

    This is the one place a lower layer reaches up: plugin discovery, as timm's model registry
    does, so that a key can be computed anywhere without remembering an import.
    """
    import ray_lt.stages  # noqa: F401

    objective = OBJECTIVES.get(kind)
    return objective() if isinstance(objective, type) else objective


def parse_params(objective: Objective, spec: StageSpec) -> Any:
    """The objective's typed parameters from the spec (unknown names are errors)."""
    return from_mapping(objective.Params, spec.param_dict)
