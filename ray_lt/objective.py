"""What a stage objective is: the method-specific pieces the engine plugs into its one loop.

A stage kind is a subclass of ``Objective`` registered by name in ``OBJECTIVES``. An instance is
bound to one stage: ``make_objective(spec)`` constructs the kind's class with the stage's spec,
and its members read ``self.spec`` and the typed ``self.params``. ``Objective`` declares every
member the engine, the pipeline and the sweep's preflight call, each with its default; a kind
overrides what differs. The engine owns everything else: epochs, optimiser, schedule, mixed
precision, DDP, evaluation, reports, checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ray_lt.data.spec import LTDataset
from ray_lt.registry import Registry
from ray_lt.spec import StageSpec, TrainSpec, from_mapping

# The Params fields ``create_model`` takes; ``Objective.architecture`` reports those a kind has.
MODEL_FIELDS = ("backbone", "head", "backbone_kwargs", "head_kwargs")


@dataclass
class UpstreamArtifact:
    """An upstream stage's output as a worker sees it: its spec, weights and tables."""

    key: str
    spec: dict[str, Any]  # spec.json: {"key": ..., "spec": StageSpec.to_dict(), ...}
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(
        default_factory=dict
    )  # name -> pyarrow.Table (tables/*.parquet)


def uses_channels_last(train: TrainSpec, device: torch.device) -> bool:
    """The one memory-format rule: image batches and the models that read them are
    channels_last on CUDA when the stage's ``TrainSpec`` asks for it."""
    return device.type == "cuda" and train.channels_last


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

    @property
    def channels_last(self) -> bool:
        """Whether this stage's image tensors and models use channels_last (CUDA only)."""
        return uses_channels_last(self.spec.train, self.device)

    @staticmethod
    def unwrapped(model: nn.Module) -> nn.Module:
        """The objective's own module under the engine's DDP wrapper (``model`` when unwrapped):
        for its buffers and methods; the forward that trains goes through ``model``."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.module
        return model


@dataclass
class Batch:
    """One training batch, already augmented and on the device."""

    x: torch.Tensor  # float, normalised, [B, 3, H, W]
    y: torch.Tensor  # int64 [B]
    index: torch.Tensor  # int64 [B]: rows of the train split
    raw: torch.Tensor  # uint8 [B, 3, H, W] before augmentation (for objectives with other views)
    generator: torch.Generator  # the stage's augmentation generator, for extra views
    # uint8 [B, 3, H, W]: a second crop + flip of each full image, independent of x's, at the
    # objective's ``second_view`` scale; None when the objective asks for none.
    view2: torch.Tensor | None = None


@dataclass(frozen=True)
class NoParams:
    """A stage kind without parameters: its inputs and ``TrainSpec`` decide everything."""


class Objective:
    """A registered stage kind, bound to one stage by ``make_objective(spec)``.

    Subclass it directly and register the subclass: ``@OBJECTIVES.register("name")``. ``build``
    and ``loss`` have no default; every other member does.
    """

    version: ClassVar[str]  # no default: enters the stage key; bump it when results change
    Params: ClassVar[type] = NoParams  # a frozen dataclass; unknown names in a spec are errors
    # True: a cheap CPU stage, run in the trial's own process rather than as a Ray Train fit.
    in_trial: ClassVar[bool] = False
    # The area range (fractions of the image) of a second random resized crop + flip that the
    # engine draws from each full image, independently of the first, as ``Batch.view2``: on the
    # device from the stored image, or decoded by the CPU from the JPEG on a streamed split (a
    # second decode per image). A crop of the first crop would not be a view of the image.
    # None: no second view, no cost.
    second_view: ClassVar[tuple[float, float] | None] = None

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.params = parse_params(type(self), spec)

    def validate(self, counts: np.ndarray) -> None:
        """Check the stage's params, inputs and training settings against each other and the
        dataset's per-class training counts, before anything trains; raise a one-line
        ``ConfigError`` naming the fix. The sweep's preflight calls it on the driver with the
        real counts; the stage runs the same checks again where it trains (``build``, or
        ``prepare_data`` when the view replaces the counts). Default: nothing to check."""

    def prepare_data(self, data: LTDataset, inputs: Mapping[str, UpstreamArtifact]) -> LTDataset:
        """The view of the dataset the stage trains and evaluates on (a class subset with new
        labels, float rows read from upstream tables, ...). Default: ``data`` as it is."""
        return data

    def build(self, ctx: StageContext) -> nn.Module:
        """The model to train, returning ``(features, logits)``; frozen parts have grads off.

        It may put frozen helpers (teachers, experts) in ``ctx.aux``."""
        raise NotImplementedError(f"stage kind '{self.spec.kind}' defines no build")

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext) -> dict[str, torch.Tensor]:
        """Named loss terms of one batch; the engine sums them and logs each. ``model`` may be
        wrapped for DDP (``ctx.unwrapped(model)`` is the module ``build`` returned)."""
        raise NotImplementedError(f"stage kind '{self.spec.kind}' defines no loss")

    def predict(self, model: nn.Module, x: torch.Tensor) -> tuple:
        """Evaluation outputs of the unwrapped model: ``(features, logits)``, or
        ``(features, logits, extras)`` where ``extras`` maps a name to an ``[N, ...]`` tensor
        exported as a table column; ``logits_<head>`` extras are scored as ``<head>_overall``...
        Default: ``model(x)``."""
        return model(x)

    def export_tables(self, model: nn.Module, ctx: StageContext) -> dict[str, Any]:
        """Extra artifact tables (name -> pyarrow.Table) beside the per-sample ones, from the
        unwrapped model. Default: none."""
        return {}

    def architecture(self) -> dict[str, Any]:
        """The ``create_model`` arguments among this stage's params (``backbone``, ``head``,
        ``backbone_kwargs``, ``head_kwargs``, those it has): the preflight checks their names
        and the default ``rebuild`` builds from them."""
        values = dataclasses.asdict(self.params)
        return {name: values[name] for name in MODEL_FIELDS if name in values}

    def rebuild(
        self,
        weights: Mapping[str, torch.Tensor] | None,
        num_classes: int,
        *,
        keep_head: bool = True,
    ) -> nn.Module:
        """This stage's model rebuilt from its stored weights, for a stage downstream.

        Returns an ``LTModel`` (``(features, logits)``) when ``keep_head``, else its backbone
        (pooled features, an int ``feature_dim``) with the ``backbone.*`` weights only.
        ``weights=None`` gives an untrained skeleton (the architecture, for widths and shapes).
        Default: ``create_model`` from ``architecture()``.
        """
        from ray_lt.stages.upstream import load_weights, plain_model  # the toolkit, a layer up

        arch = self.architecture()
        model = plain_model(self.spec.kind, arch, num_classes)
        return load_weights(
            model, weights, keep_head=keep_head, kind=self.spec.kind, backbone=arch["backbone"]
        )


OBJECTIVES: Registry[type[Objective]] = Registry("stage kind")


def get_objective(kind: str) -> type[Objective]:
    """The class registered as ``kind``; importing ``ray_lt.stages`` registers them all.

    This and the default ``rebuild`` are where this layer reaches up to the stages: plugin
    discovery, as timm's model registry does, so that a key can be computed anywhere without
    remembering an import.
    """
    import ray_lt.stages  # noqa: F401

    return OBJECTIVES.get(kind)


def make_objective(spec: StageSpec) -> Objective:
    """The objective of one stage: its kind's class bound to ``spec`` (params parsed, checked)."""
    return get_objective(spec.kind)(spec)


def parse_params(objective: type[Objective] | Objective, spec: StageSpec) -> Any:
    """The objective's typed parameters from the spec (unknown names are errors)."""
    return from_mapping(objective.Params, spec.param_dict)
