"""SSD-LT (Li, Wang, Wu, ICCV 2021): ``ssd_feature`` (stage I) and ``ssd_distill`` (stage III).

Stage II (the balanced teacher) and the optional fine-tune are the shared ``lws`` stage
(stages/baseline.py), which rebuilds these stages' models through their ``rebuild``: the encoder
and the linear (hard) head, every other submodule dropped.

Stage I, ``ssd_feature``: CE on the engine's weak view (``TrainSpec.augment``, ``crop_flip`` on
CIFAR) plus ``ssl_weight`` x a MoCo loss whose key view is a second crop + flip of the full image
at MoCo's scale 0.2-1 (``second_view``: drawn by the engine independently of the query's crop, on
the device or by the CPU decoder), then the photometric part of ``key_augment`` (``moco_v2`` or
``moco_v2_blur``: jitter, grey, blur) with the stage's generator. The model, its EMA key
encoder and its labelled queue are in stages/ssd_models.py. ``ssl_weight=0`` (the CE-only
ablation) builds a plain backbone + linear head, no MLP or queue. The queue length ``K`` must
be a multiple of the batch and at most the training-set size (checked on the real train counts
by ``validate``, on the driver and at build).

Stage III, ``ssd_distill``: a fresh network with a hard head (CE) and a soft head (KD from the
frozen teacher on the same augmented batch, ``T^2 KL(softmax(t/T) || softmax(s/T))`` summed over
classes, mean over the batch). Neither head gets the other's loss. Evaluation reports the hard
head as the primary logits and the soft head as ``logits_soft`` (metrics ``soft_*``). The
teacher (input ``teacher``: an ``lws`` stage for the balanced teacher, or an ``ssd_feature``
stage for the "plain teacher" ablation) lives in ``ctx.aux`` in eval mode, as the paper
describes; ``teacher_bn="train"`` reproduces the official code, which leaves it in train mode
(its BatchNorm uses, and re-estimates, batch statistics). ``kd_weight=0`` builds no soft head and
needs no teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_lt.data import augment_batch
from ray_lt.data.augment import KEY_VIEW_PHOTOMETRIC, MOCO_SCALE
from ray_lt.errors import ConfigError
from ray_lt.models import LTModel, create_model, linear_head
from ray_lt.objective import OBJECTIVES, Batch, Objective, StageContext
from ray_lt.stages.ssd_models import (
    SSDDistillModel,
    SSDFeatureModel,
    contrastive_loss,
    kd_loss,
    queue_length,
)
from ray_lt.stages.upstream import ce_terms, cross_entropy, frozen_input, to_layout

TEACHER_BN = ("eval", "train")
PLAIN = ("backbone", "head")  # what a downstream stage keeps of an SSD-LT model


def _plain(weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The encoder and linear (hard) head of an SSD-LT model's weights."""
    if weights is None:
        return None
    return {k: v for k, v in weights.items() if k.split(".", 1)[0] in PLAIN}


@dataclass(frozen=True)
class SSDFeatureParams:
    backbone: str = "resnet32"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    ssl_weight: float = 1.0  # lambda: CE : SSL = 1 : lambda; 0 = the CE-only ablation
    mask_labels: bool = True  # drop same-label queue entries from the negatives (SSD vs MoCo)
    # None: the largest multiple of the batch <= the training-set size, which gives the recipes'
    # values: 10,752 = 84 x 128 on CIFAR-100-LT IF100 and 115,712 = 452 x 256 on ImageNet-LT.
    queue_size: int | None = None
    embed_dim: int = 128
    hidden_dim: int | None = None  # None: the backbone width (CIFAR); 2048 on ImageNet-LT
    temperature: float = 0.2
    momentum: float = 0.999
    key_augment: str = "moco_v2"

    def __post_init__(self) -> None:
        if not self.ssl_weight >= 0:
            raise ConfigError(f"ssd_feature ssl_weight must be >= 0, got {self.ssl_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"ssd_feature temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"ssd_feature momentum must be in [0, 1), got {self.momentum}")
        for name, value in (("embed_dim", self.embed_dim), ("hidden_dim", self.hidden_dim)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"ssd_feature {name} must be an int >= 1, got {value!r}")


@OBJECTIVES.register("ssd_feature")
class SSDFeature(Objective):
    """Stage I: CE on the weak view + ``ssl_weight`` x label-masked MoCo on a MoCo-v2 view."""

    version = "2"  # 2: the key is an independent crop of the full image, not of the query's
    Params = SSDFeatureParams
    second_view = MOCO_SCALE

    def validate(self, counts: np.ndarray) -> None:
        """The key augmentation exists; the queue fits the batch and the training set."""
        if self.params.key_augment not in KEY_VIEW_PHOTOMETRIC:
            raise ConfigError(
                f"ssd_feature key_augment '{self.params.key_augment}' is not a key view; use "
                f"one of {sorted(KEY_VIEW_PHOTOMETRIC)}"
            )
        if self.params.ssl_weight > 0:
            self._queue_size(counts)

    def build(self, ctx: StageContext) -> nn.Module:
        counts = ctx.data.class_counts
        self.validate(counts)
        p = self.params
        backbone = create_model(p.backbone, ctx.num_classes, backbone_kwargs=p.backbone_kwargs)
        backbone = backbone.backbone
        if p.ssl_weight == 0:
            return LTModel(backbone, linear_head(backbone.feature_dim, ctx.num_classes))
        return SSDFeatureModel(
            backbone,
            ctx.num_classes,
            hidden_dim=p.hidden_dim or int(backbone.feature_dim),
            embed_dim=p.embed_dim,
            queue_size=self._queue_size(counts),
        )

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        p = self.params
        if p.ssl_weight == 0:
            return ce_terms(model, batch)
        net = ctx.unwrapped(model)
        _, logits, q = model(batch.x, embed=True)
        terms = {"ce": cross_entropy(logits, batch.y)}
        with torch.no_grad():
            net.momentum_update(p.momentum)
            photometric = KEY_VIEW_PHOTOMETRIC[p.key_augment]
            assert batch.view2 is not None, "the engine draws view2 for second_view"
            view = augment_batch(
                photometric, batch.view2, batch.generator, ctx.data.mean, ctx.data.std
            )
            k = net.keys(to_layout(view, ctx))
        # Clones: the queue is overwritten below, and autograd needs the values it multiplied.
        ssl = contrastive_loss(
            q,
            k,
            net.queue.clone(),
            net.queue_labels.clone(),
            batch.y,
            temperature=p.temperature,
            mask_labels=p.mask_labels,
        )
        terms["ssl"] = p.ssl_weight * ssl
        net.enqueue(k, batch.y)
        return terms

    def rebuild(self, weights, num_classes: int, *, keep_head: bool = True) -> nn.Module:
        """The encoder and linear classifier (what ``lws`` and a plain teacher use)."""
        return super().rebuild(_plain(weights), num_classes, keep_head=keep_head)

    def _queue_size(self, counts: np.ndarray) -> int:
        n_train = int(np.sum(counts))
        return queue_length(self.params.queue_size, self.spec.train.batch_size, n_train)


@dataclass(frozen=True)
class SSDDistillParams:
    backbone: str = "resnet32"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    kd_weight: float = 1.0  # CE : KD = 1 : kd_weight; 0 = no soft head, no teacher
    temperature: float = 2.0
    teacher_bn: str = "eval"  # "train": the official code's teacher in train mode

    def __post_init__(self) -> None:
        if not self.kd_weight >= 0:
            raise ConfigError(f"ssd_distill kd_weight must be >= 0, got {self.kd_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"ssd_distill temperature must be > 0, got {self.temperature}")
        if self.teacher_bn not in TEACHER_BN:
            raise ConfigError(
                f"ssd_distill teacher_bn '{self.teacher_bn}' is unknown; use one of {TEACHER_BN}"
            )


@OBJECTIVES.register("ssd_distill")
class SSDDistill(Objective):
    """Stage III: fresh network, CE on the hard head, KD from the frozen teacher on the soft."""

    version = "1"
    Params = SSDDistillParams

    def validate(self, counts: np.ndarray) -> None:
        """Only a ``teacher`` input, and one when KD is on."""
        names = sorted(n for n, _ in self.spec.inputs)
        if names not in ([], ["teacher"]):
            raise ConfigError(
                f"ssd_distill takes one input named 'teacher', got {names}; "
                "use inputs={'teacher': <lws or ssd_feature spec>}"
            )
        if self.params.kd_weight > 0 and not names:
            raise ConfigError(
                f"ssd_distill has no 'teacher' input with kd_weight={self.params.kd_weight}; add "
                "inputs={'teacher': <lws spec>} or set kd_weight=0"
            )

    def build(self, ctx: StageContext) -> nn.Module:
        self.validate(ctx.data.class_counts)
        p = self.params
        if p.kd_weight > 0:
            batch_stats = p.teacher_bn == "train"
            ctx.aux["teacher"] = frozen_input(ctx, "teacher", batch_stats=batch_stats)
        backbone = create_model(p.backbone, ctx.num_classes, backbone_kwargs=p.backbone_kwargs)
        return SSDDistillModel(backbone.backbone, ctx.num_classes, soft_head=p.kd_weight > 0)

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        p = self.params
        if p.kd_weight == 0:
            return ce_terms(model, batch)
        _, hard, soft = model(batch.x, soft=True)
        with torch.no_grad():
            _, target = ctx.aux["teacher"](batch.x)
        return {
            "ce": cross_entropy(hard, batch.y),
            "kd": p.kd_weight * kd_loss(soft, target, p.temperature),
        }

    def predict(self, model: nn.Module, x: torch.Tensor):
        """Hard head as the primary logits; the soft head as ``logits_soft`` (``soft_*``)."""
        if self.params.kd_weight == 0:
            return model(x)
        features, hard, soft = model(x, soft=True)
        return features, hard, {"logits_soft": soft}

    def rebuild(self, weights, num_classes: int, *, keep_head: bool = True) -> nn.Module:
        """Encoder and hard head, as the official fine-tune keeps (the soft head is dropped)."""
        return super().rebuild(_plain(weights), num_classes, keep_head=keep_head)
