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

Both rebuild their ``features`` input with its own kind's ``rebuild`` and swap the head; a stage
downstream of them rebuilds the upstream's architecture with their head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ray_lt.errors import ConfigError
from ray_lt.models import HEADS, LWSHead, create_model, freeze
from ray_lt.objective import OBJECTIVES, Batch, Objective, StageContext, make_objective
from ray_lt.stages.upstream import ce_terms, load_weights, need_input, rebuild_input


@dataclass(frozen=True)
class CEParams:
    backbone: str = "resnet32"
    head: str = "linear"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


@OBJECTIVES.register("ce")
class CrossEntropy(Objective):
    """Supervised training of backbone and head from scratch."""

    version = "1"
    Params = CEParams

    def build(self, ctx: StageContext) -> nn.Module:
        p = self.params
        return create_model(
            p.backbone,
            ctx.num_classes,
            head=p.head,
            backbone_kwargs=p.backbone_kwargs,
            head_kwargs=p.head_kwargs,
        )

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        return ce_terms(model, batch)


def _upstream_architecture(objective: Objective, num_classes: int) -> nn.Module:
    """The untrained model of a cRT / LWS stage's ``features`` input (its head replaced next),
    drawing from the caller's RNG like the rest of the rebuild."""
    features = need_input(objective.spec, "features", "a trained 'ce' stage")
    return make_objective(features).rebuild(None, num_classes)


@dataclass(frozen=True)
class CRTParams:
    head: str = "linear"
    head_kwargs: dict[str, Any] = field(default_factory=dict)


@OBJECTIVES.register("crt")
class ClassifierRetraining(Objective):
    """Frozen upstream features, a fresh classifier trained with the stage's sampler."""

    version = "1"
    Params = CRTParams

    def build(self, ctx: StageContext) -> nn.Module:
        model = rebuild_input(ctx, "features", isolate_rng=False)
        freeze(model.backbone)
        model.head = self._head(model.feature_dim, ctx.num_classes)
        return model

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        return ce_terms(model, batch)

    def rebuild(self, weights, num_classes: int, *, keep_head: bool = True) -> nn.Module:
        """The upstream's architecture with this stage's head."""
        model = _upstream_architecture(self, num_classes)
        model.head = self._head(model.feature_dim, num_classes)
        return load_weights(model, weights, keep_head=keep_head, kind="crt")

    def _head(self, width: int, num_classes: int) -> nn.Module:
        return HEADS.get(self.params.head)(width, num_classes, **self.params.head_kwargs)


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
class LearnableWeightScaling(Objective):
    """Frozen upstream model; only a per-class scale of its linear classifier learns."""

    version = "1"
    Params = LWSParams

    def build(self, ctx: StageContext) -> nn.Module:
        model = rebuild_input(ctx, "features", isolate_rng=False)
        if not isinstance(model.head, nn.Linear):
            raise ConfigError(
                f"lws needs an upstream linear head, got {type(model.head).__name__}; "
                "train the upstream stage with head='linear'"
            )
        freeze(model.backbone)
        if self.params.bn == "batch":  # the engine keeps it in train mode despite frozen params
            model.backbone.update_batch_stats = True
        model.head = LWSHead.from_linear(model.head)
        return model

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        return ce_terms(model, batch)

    def rebuild(self, weights, num_classes: int, *, keep_head: bool = True) -> nn.Module:
        """The upstream's backbone with an LWS head (an SSD-LT teacher is an lws stage)."""
        model = _upstream_architecture(self, num_classes)
        model.head = LWSHead(model.feature_dim, num_classes)
        return load_weights(model, weights, keep_head=keep_head, kind="lws")
