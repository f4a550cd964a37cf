"""The decoupling baselines: ``ce`` (instance-sampled cross-entropy), ``crt`` and ``lws``.

``crt`` (classifier re-training) and ``lws`` (learnable weight scaling) follow Kang et al.,
"Decoupling representation and classifier" (classifier-balancing): the ``ce`` stage's features are
frozen (kept in eval mode, so BatchNorm statistics do not move) and only the classifier (cRT,
re-initialised) or a per-class scale of the trained classifier (LWS) learns, with class-balanced
sampling set in the stage's ``TrainSpec``.

``lws`` also serves SSD-LT (stage II and the optional fine-tune). Its ``bn`` option names the one
place the original code differs from the paper: ``"frozen"`` (default, the paper and Kang et al.)
keeps the frozen encoder's BatchNorm in eval mode; ``"batch"`` is SSD-LT's code, which calls
``model.train()`` on the whole model, so the frozen encoder normalises with batch statistics and
re-estimates its running statistics on the class-balanced batches (and saves them).

Upstream models are rebuilt by ``lt_model`` from the upstream's spec doc: an objective with an
``lt_model(spec, num_classes, state_dict)`` member (SSD-LT's stages) gives its own plain
``LTModel`` view; ``crt`` / ``lws`` rebuild their own upstream's architecture and swap the head;
any other kind is ``create_model`` from its ``backbone`` / ``head`` params.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.errors import ConfigError
from ray_lt.models import HEADS, LTModel, LWSHead, create_model, freeze
from ray_lt.objective import OBJECTIVES, Batch, StageContext, get_objective


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


def lt_model(
    spec: Mapping[str, Any],
    num_classes: int,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> LTModel:
    """The plain ``LTModel`` (backbone + one head) of a stage, with its weights if given.

    Args:
        spec: the stage's ``StageSpec.to_dict()`` form (``spec.json``'s ``"spec"``), inputs
            nested, so ``crt`` / ``lws`` can rebuild the architecture below them.
        num_classes: C.
        state_dict: the stage's stored weights, or None for an untrained skeleton.
    """
    kind = spec.get("kind", "ce")
    own = getattr(get_objective(kind), "lt_model", None)
    if own is not None:
        return own(spec, num_classes, state_dict)
    p = spec.get("params", {}) or {}
    backbone_kwargs = dict(p.get("backbone_kwargs") or {})
    if state_dict is not None:  # the stored weights replace a pretrained start: never re-read it
        backbone_kwargs.pop("weights_path", None)
    backbone = p.get("backbone", "resnet32")
    model = create_model(
        backbone,
        num_classes,
        head=p.get("head", "linear"),
        backbone_kwargs=backbone_kwargs,
        head_kwargs=p.get("head_kwargs") or {},
    )
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"the stored weights of a '{kind}' stage do not fit backbone '{backbone}' with "
                f"{num_classes} outputs ({first}); check that stage's params"
            ) from exc
    return model


def _features_input(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    features = (spec.get("inputs") or {}).get("features")
    if features is None:
        raise ConfigError(
            f"cannot rebuild a '{spec.get('kind')}' stage: its spec has no 'features' input; "
            "was it written by an older ray-lt? re-run it"
        )
    return features


def upstream_model(ctx: StageContext, input_name: str = "features") -> nn.Module:
    """Rebuild an upstream stage's model from its spec and load its stored weights."""
    if input_name not in ctx.inputs:
        raise ConfigError(
            f"stage '{ctx.spec.kind}' needs an input named '{input_name}' (a trained 'ce' stage);"
            f" got {sorted(ctx.inputs)}"
        )
    upstream = ctx.inputs[input_name]
    return lt_model(upstream.spec["spec"], ctx.num_classes, upstream.state_dict)


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

    @staticmethod
    def lt_model(spec: Mapping[str, Any], num_classes: int, state_dict=None) -> LTModel:
        """The upstream's architecture with this stage's head (for stages downstream of cRT)."""
        p = spec.get("params", {}) or {}
        model = lt_model(_features_input(spec), num_classes)
        head = HEADS.get(p.get("head", "linear"))
        model.head = head(model.feature_dim, num_classes, **(p.get("head_kwargs") or {}))
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model


LWS_BN = ("frozen", "batch")


@dataclass(frozen=True)
class LWSParams:
    bn: str = "frozen"  # "batch": SSD-LT's code, the frozen encoder re-estimates BN statistics

    def __post_init__(self) -> None:
        if self.bn not in LWS_BN:
            raise ConfigError(
                f"lws bn '{self.bn}' is unknown; use 'frozen' (eval statistics, the default) or "
                "'batch' (re-estimate the frozen encoder's BatchNorm statistics, SSD-LT's code)"
            )


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
        if params.bn == "batch":  # the engine keeps it in train mode despite frozen params
            model.backbone.update_batch_stats = True
        model.head = LWSHead.from_linear(model.head)
        return model

    def loss(self, params: LWSParams, model: nn.Module, batch: Batch, ctx: StageContext):
        return cross_entropy(model, batch)

    @staticmethod
    def lt_model(spec: Mapping[str, Any], num_classes: int, state_dict=None) -> LTModel:
        """The upstream's backbone with an LWS head (an SSD-LT teacher is an lws stage)."""
        model = lt_model(_features_input(spec), num_classes)
        model.head = LWSHead(model.feature_dim, num_classes)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model
