"""Class-Balanced Distillation (Iscen et al., BMVC 2021): ``cbd_teacher`` and ``cbd_student``.

CBD keeps the whole network learning in the class-balanced stage: a fresh student trains with
class-balanced sampling (set in the student's ``TrainSpec``) on ``(1 - alpha) * CE`` plus
``alpha * beta * (1 - cos)`` between its projected feature and the frozen teachers' features.
One teacher is CBD, several (vanilla and data_aug, different seeds) CBD_ENS.

Teachers are upstream stages, rebuilt from their artifacts without their heads. They live in
``ctx.aux["teachers"]``, not inside the student: they are never optimised, never wrapped by DDP,
never saved in the student's artifact, and stay in eval mode (the engine's per-epoch
``train()`` only reaches the student). The student's network is in stages/cbd_models.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import nn

from ray_lt.data import augment_batch
from ray_lt.errors import ConfigError
from ray_lt.models import create_model
from ray_lt.objective import OBJECTIVES, Batch, Objective, StageContext
from ray_lt.spec import StageSpec
from ray_lt.stages.cbd_models import CBDStudentModel, teacher_target
from ray_lt.stages.upstream import cross_entropy, frozen, rebuild_input, skeleton, to_layout

TEACHER_AUGMENTS = ("vanilla", "data_aug")
TEACHER_INPUT = re.compile(r"teacher(0|[1-9][0-9]*)")
DATA_AUG = "crop_flip_simclr"  # ray_lt.data.augment: crop + flip + SimCLR-v2 colour, grey


@dataclass(frozen=True)
class CBDTeacherParams:
    backbone: str = "resnet32"
    scale: float = 16.0  # fixed cosine scale: 16 for 64-d CIFAR features, 20 in CBD's ImageNet
    augment: str = "vanilla"  # "data_aug": re-augment each batch with crop_flip_simclr
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.augment not in TEACHER_AUGMENTS:
            raise ConfigError(
                f"cbd_teacher augment '{self.augment}' is unknown; use one of "
                f"{', '.join(repr(a) for a in TEACHER_AUGMENTS)}"
            )


@OBJECTIVES.register("cbd_teacher")
class CBDTeacher(Objective):
    """Instance-sampled CE with a fixed-scale cosine head; ``data_aug`` adds colour distortion.

    The data_aug view replaces the engine's one: it is drawn from the raw uint8 batch with the
    stage's generator, so the teacher's augmentation is part of its params (and key) while the
    engine's ``TrainSpec.augment`` stays ``crop_flip``.
    """

    version = "1"
    Params = CBDTeacherParams

    def architecture(self) -> dict[str, Any]:
        """The backbone params with a cosine head of fixed scale (built, and rebuilt, so)."""
        head_kwargs = {"scale": self.params.scale, "learn_scale": False}
        return {**super().architecture(), "head": "cosine", "head_kwargs": head_kwargs}

    def build(self, ctx: StageContext) -> nn.Module:
        return create_model(num_classes=ctx.num_classes, **self.architecture())

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        x = batch.x
        if self.params.augment == "data_aug":
            x = augment_batch(DATA_AUG, batch.raw, batch.generator, ctx.data.mean, ctx.data.std)
            x = to_layout(x, ctx)
        _, logits = model(x)
        return {"ce": cross_entropy(logits, batch.y)}


@dataclass(frozen=True)
class CBDStudentParams:
    backbone: str = "resnet32"
    alpha: float = 0.4  # CE weight 1 - alpha; 0 = class-balanced training with no teachers
    beta: float = 100.0  # multiplies the mean cosine distance (alpha * beta = 40 by default)
    scale: float = 16.0  # fixed cosine scale of the student's classifier
    proj_dim: int | None = None  # None: the teachers' concatenated width (backbone width if none)
    use_projection: bool = True  # False: the classifier sits on the normalised pooled feature
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"cbd_student alpha must be in [0, 1], got {self.alpha}; CBD: 0.4")
        if not self.beta >= 0.0:
            raise ConfigError(f"cbd_student beta must be >= 0, got {self.beta}; CBD: 100")
        if self.proj_dim is not None and (
            isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int)
        ):
            raise ConfigError(
                f"cbd_student proj_dim must be an int or None, got {self.proj_dim!r}; e.g. 128"
            )
        if self.proj_dim is not None and self.proj_dim < 1:
            raise ConfigError(f"cbd_student proj_dim must be >= 1, got {self.proj_dim}")


@OBJECTIVES.register("cbd_student")
class CBDStudent(Objective):
    """A fresh network distilling the normalised, concatenated teacher features; CE on its logits.

    Inputs ``teacher0``, ``teacher1``, ... (any number, concatenated in numeric order); with
    ``alpha == 0`` no teacher is needed and no distillation term is computed. The checks run on
    the widths the specs imply (``validate``) and again on the rebuilt teachers (``build``).
    """

    version = "1"
    Params = CBDStudentParams

    def validate(self, counts: np.ndarray) -> None:
        inputs, n = self.spec.input_dict, len(counts)
        widths = {t: width_of(inputs[t], n) for t in self._teacher_names()}
        self._feature_width(widths, width_of(self.spec, n))

    def build(self, ctx: StageContext) -> nn.Module:
        teachers = {t: rebuild_input(ctx, t, keep_head=False) for t in self._teacher_names()}
        p = self.params
        backbone = create_model(p.backbone, ctx.num_classes, backbone_kwargs=p.backbone_kwargs)
        backbone = backbone.backbone
        widths = {t: int(teacher.feature_dim) for t, teacher in teachers.items()}
        width = self._feature_width(widths, int(backbone.feature_dim))
        proj_dim = width if p.use_projection else None
        model = CBDStudentModel(backbone, ctx.num_classes, proj_dim=proj_dim, scale=p.scale)
        if p.alpha > 0:
            ctx.aux["teachers"] = {t: frozen(teacher, ctx) for t, teacher in teachers.items()}
        return model

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        alpha = self.params.alpha
        features, logits = model(batch.x)
        terms = {"ce": (1.0 - alpha) * cross_entropy(logits, batch.y)}
        if alpha > 0:
            target = teacher_target(ctx.aux["teachers"].values(), batch.x)
            cos = F.cosine_similarity(features.float(), target, dim=1)
            terms["distill"] = alpha * self.params.beta * (1.0 - cos).mean()
        return terms

    def _teacher_names(self) -> list[str]:
        """The input names, all ``teacherN``, in numeric order (teacher2 before teacher10)."""
        names = [n for n, _ in self.spec.inputs]
        bad = [n for n in names if not TEACHER_INPUT.fullmatch(n)]
        if bad:
            raise ConfigError(
                f"cbd_student inputs must be named teacher0, teacher1, ...; got {sorted(bad)}; "
                "rename them in the pipeline, e.g. inputs={'teacher0': <cbd_teacher spec>}"
            )
        if self.params.alpha > 0 and not names:
            raise ConfigError(
                "cbd_student needs at least one teacher input (teacher0, ...) when alpha > 0; "
                f"got an empty teacher list with alpha={self.params.alpha}; name at least one "
                "teacher (e.g. teachers='vanilla1'), or set alpha=0 for class-balanced training "
                "without distillation"
            )
        return sorted(names, key=lambda n: int(n[len("teacher") :]))

    def _feature_width(self, teachers: dict[str, int], backbone_width: int) -> int:
        """The student's feature width, checked against the teachers' (one width each)."""
        if len(set(teachers.values())) > 1:
            listed = ", ".join(f"{n}={w}" for n, w in teachers.items())
            raise ConfigError(
                f"cbd_student teachers must share one feature width; got {listed}; "
                "use teachers with backbones of the same width"
            )
        p, target = self.params, sum(teachers.values())
        if not p.use_projection and p.proj_dim not in (None, backbone_width):
            raise ConfigError(
                f"cbd_student proj_dim={p.proj_dim} needs use_projection=True (the backbone "
                f"width is {backbone_width}); set use_projection=True or drop proj_dim"
            )
        width = (p.proj_dim or target or backbone_width) if p.use_projection else backbone_width
        if p.alpha > 0 and width != target:
            what = "proj_dim" if p.use_projection else "the backbone width (no projection)"
            raise ConfigError(
                f"cbd_student {what}={width} must equal the teachers' concatenated width "
                f"{target} when alpha > 0; set proj_dim={target} or leave it None"
            )
        return width


def width_of(spec: StageSpec, num_classes: int) -> int:
    """The pooled-feature width of a stage's backbone, from its untrained skeleton."""
    return int(skeleton(spec, num_classes, keep_head=False).feature_dim)
