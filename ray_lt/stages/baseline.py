"""The decoupling baselines: ``ce`` (instance-sampled cross-entropy), ``crt`` and ``lws``.

``crt`` (classifier re-training) and ``lws`` (learnable weight scaling) follow Kang et al.,
"Decoupling representation and classifier" (classifier-balancing): the ``ce`` stage's features are
frozen (kept in eval mode, so BatchNorm statistics do not move) and only the classifier (cRT,
re-initialised) or a per-class scale of the trained classifier (LWS) learns, with class-balanced
sampling set in the stage's ``TrainSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.errors import ConfigError
from ray_lt.models import HEADS, LWSHead, create_model, freeze
from ray_lt.objective import OBJECTIVES, Batch, StageContext


@dataclass(frozen=True)
class CEParams:
    backbone: str = "resnet32"
    head: str = "linear"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


def cross_entropy(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Plain softmax cross-entropy on the model's logits."""
    _, logits = model(batch.x)
    return {"ce": F.cross_entropy(logits.float(), batch.y)}


@OBJECTIVES.register("ce")
class CrossEntropy:
    """Supervised training of backbone and head from scratch."""

    version = "1"
    Params = CEParams

    def build(self, params: CEParams, ctx: StageContext) -> nn.Module:
        return create_model(
            params.backbone,
            ctx.num_classes,
            head=params.head,
            backbone_kwargs=params.backbone_kwargs,
            head_kwargs=params.head_kwargs,
        )

    def loss(self, params: CEParams, model: nn.Module, batch: Batch, ctx: StageContext):
        return cross_entropy(model, batch)


def upstream_model(ctx: StageContext, input_name: str = "features") -> nn.Module:
    """Rebuild an upstream stage's model from its spec and load its stored weights."""
    if input_name not in ctx.inputs:
        raise ConfigError(
            f"stage '{ctx.spec.kind}' needs an input named '{input_name}' (a trained 'ce' stage);"
            f" got {sorted(ctx.inputs)}"
        )
    upstream = ctx.inputs[input_name]
    up = upstream.spec["spec"]
    p = up.get("params", {})
    model = create_model(
        p.get("backbone", "resnet32"),
        ctx.num_classes,
        head=p.get("head", "linear"),
        backbone_kwargs=p.get("backbone_kwargs") or {},
        head_kwargs=p.get("head_kwargs") or {},
    )
    model.load_state_dict(upstream.state_dict)
    return model


@dataclass(frozen=True)
class CRTParams:
    head: str = "linear"
    head_kwargs: dict[str, Any] = field(default_factory=dict)


@OBJECTIVES.register("crt")
class ClassifierRetraining:
    """Frozen upstream features, a fresh classifier trained with the stage's sampler."""

    version = "1"
    Params = CRTParams

    def build(self, params: CRTParams, ctx: StageContext) -> nn.Module:
        model = upstream_model(ctx)
        freeze(model.backbone)
        model.head = HEADS.get(params.head)(
            model.feature_dim, ctx.num_classes, **params.head_kwargs
        )
        return model

    def loss(self, params: CRTParams, model: nn.Module, batch: Batch, ctx: StageContext):
        return cross_entropy(model, batch)


@dataclass(frozen=True)
class LWSParams:
    pass


@OBJECTIVES.register("lws")
class LearnableWeightScaling:
    """Frozen upstream model; only a per-class scale of its linear classifier learns."""

    version = "1"
    Params = LWSParams

    def build(self, params: LWSParams, ctx: StageContext) -> nn.Module:
        model = upstream_model(ctx)
        if not isinstance(model.head, nn.Linear):
            raise ConfigError(
                f"lws needs an upstream linear head, got {type(model.head).__name__}; "
                "train the upstream stage with head='linear'"
            )
        freeze(model.backbone)
        model.head = LWSHead.from_linear(model.head)
        return model

    def loss(self, params: LWSParams, model: nn.Module, batch: Batch, ctx: StageContext):
        return cross_entropy(model, batch)
