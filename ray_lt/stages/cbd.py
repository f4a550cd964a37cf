"""Class-Balanced Distillation (Iscen et al., BMVC 2021): ``cbd_teacher`` and ``cbd_student``.

CBD keeps the whole network learning in the class-balanced stage: a fresh student trains with
class-balanced sampling (set in the student's ``TrainSpec``) on ``(1 - alpha) * CE`` plus
``alpha * beta * (1 - cos)`` between its projected feature and the frozen teachers' features.
One teacher is CBD, several (vanilla and data_aug, different seeds) CBD_ENS. Two variants sit
beside the official method: ``distill="logit"`` (Hinton-style KL to the teachers' mean logits)
and ``adapter=True`` (a linear map from the classifier's feature to the teachers' width, as in
the TailCalibX CIFAR recipe); docs/methods/cbd.md lists every default and its source.

Teachers are upstream stages, rebuilt from their artifacts without their heads (with them for
logit distillation). They live in ``ctx.aux["teachers"]``, not inside the student: they are
never optimised, never wrapped by DDP, never saved in the student's artifact, and stay in eval
mode (the engine's per-epoch ``train()`` only reaches the student). The student's network and
its loss terms are in stages/cbd_models.py.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.data.augment import colour_distort
from ray_lt.errors import ConfigError
from ray_lt.models import create_model
from ray_lt.objective import OBJECTIVES, Batch, Objective, StageContext
from ray_lt.spec import StageSpec
from ray_lt.stages.cbd_models import (
    CBDStudentModel,
    kl_distillation,
    teacher_mean_logits,
    teacher_target,
)
from ray_lt.stages.upstream import cross_entropy, frozen, rebuild_input, skeleton, to_layout

TEACHER_AUGMENTS = ("vanilla", "data_aug")
TEACHER_INPUT = re.compile(r"teacher(0|[1-9][0-9]*)")
DISTILL_MODES = ("feature", "logit")
# CBD's data_aug teachers: SimCLR-v2 colour distortion at strength 1, jitter with p 0.8, then
# greyscale with p 0.2 (docs/methods/cbd.md).
SIMCLR_STRENGTH, SIMCLR_P_JITTER, SIMCLR_P_GREY = 1.0, 0.8, 0.2


@dataclass(frozen=True)
class CBDTeacherParams:
    backbone: str = "resnet32"
    scale: float = 16.0  # fixed cosine scale: 16 for 64-d CIFAR features, 20 in CBD's ImageNet
    augment: str = "vanilla"  # "data_aug": SimCLR-v2 colour distortion of the engine's view
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

    A data_aug teacher distorts the colours of the engine's own augmented view (``colour_view``),
    so its crop is whatever the stage's ``TrainSpec.augment`` takes (CIFAR: ``crop_flip``;
    ImageNet scale: ``rrc05_flip``, the official 5-100 % crop) on the device and the streaming
    path alike; only the colour part is the teacher's own, part of its params (and key).
    """

    version = "2"  # 2: data_aug distorts the engine's view (1 re-cropped the raw batch)
    Params = CBDTeacherParams

    def architecture(self) -> dict[str, Any]:
        """The backbone params with a cosine head of fixed scale (built, and rebuilt, so)."""
        head_kwargs = {"scale": self.params.scale, "learn_scale": False}
        return {**super().architecture(), "head": "cosine", "head_kwargs": head_kwargs}

    def build(self, ctx: StageContext) -> nn.Module:
        return create_model(num_classes=ctx.num_classes, **self.architecture())

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        x = colour_view(batch, ctx) if self.params.augment == "data_aug" else batch.x
        _, logits = model(x)
        return {"ce": cross_entropy(logits, batch.y)}


def colour_view(batch: Batch, ctx: StageContext) -> torch.Tensor:
    """The engine's view with SimCLR-v2 colour distortion, drawn on the stage's generator.

    The view is un-normalised back to [0, 1] with the dataset's mean and std (clipped against
    rounding), distorted, and normalised again, so the geometry stays the engine's.
    """
    shape = (1, -1, 1, 1)
    mean = torch.as_tensor(ctx.data.mean, dtype=torch.float32, device=batch.x.device).view(shape)
    std = torch.as_tensor(ctx.data.std, dtype=torch.float32, device=batch.x.device).view(shape)
    images = (batch.x.float() * std + mean).clamp(0.0, 1.0)
    out = colour_distort(
        images,
        batch.generator,
        strength=SIMCLR_STRENGTH,
        p_jitter=SIMCLR_P_JITTER,
        p_grey=SIMCLR_P_GREY,
    )
    return to_layout((out - mean) / std, ctx)


@dataclass(frozen=True)
class CBDStudentParams:
    backbone: str = "resnet32"
    alpha: float = 0.4  # CE weight 1 - alpha; 0 = class-balanced training with no teachers
    beta: float = 100.0  # multiplies the mean cosine distance (alpha * beta = 40 by default)
    scale: float = 16.0  # fixed cosine scale of the student's classifier
    proj_dim: int | None = None  # None: the teachers' concatenated width (backbone width if none)
    use_projection: bool = True  # False: the classifier sits on the normalised pooled feature
    distill: str = "feature"  # "feature" (CBD) or "logit" (KL to the teachers' mean logits)
    temperature: float = 4.0  # logit distillation only: softmax temperature T
    adapter: bool = False  # True: distil Linear(feature) -> teachers' width (TailCalibX)
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
        self._check_distill()

    def _check_distill(self) -> None:
        """The logit variant's own rules: a known mode, T > 0, no feature-only knobs."""
        if self.distill not in DISTILL_MODES:
            raise ConfigError(
                f"cbd_student distill '{self.distill}' is unknown; use one of "
                f"{', '.join(repr(m) for m in DISTILL_MODES)} ('feature' is CBD's)"
            )
        if not self.temperature > 0:
            raise ConfigError(f"cbd_student temperature must be > 0, got {self.temperature}")
        if self.distill == "logit" and (self.adapter or self.beta != 100.0):
            raise ConfigError(
                "cbd_student adapter and beta apply to distill='feature' only; with "
                f"distill='logit' leave them at their defaults (got adapter={self.adapter}, "
                f"beta={self.beta}); the logit term is alpha * KL * T^2"
            )


@OBJECTIVES.register("cbd_student")
class CBDStudent(Objective):
    """A fresh network distilling the normalised, concatenated teacher features; CE on its logits.

    Inputs ``teacher0``, ``teacher1``, ... (any number, concatenated in numeric order); with
    ``alpha == 0`` no teacher is needed and no distillation term is computed. The checks run on
    the widths the specs imply (``validate``) and again on the rebuilt teachers (``build``).
    The student's weights are drawn from its own stream (``init_seed``): a teacher trained with
    the same ``TrainSpec.seed`` would otherwise start from the very same backbone.
    """

    version = "2"  # 2: own initialisation stream (1 drew a same-seed teacher's init)
    Params = CBDStudentParams

    def validate(self, counts: np.ndarray) -> None:
        inputs, n = self.spec.input_dict, len(counts)
        widths = {t: width_of(inputs[t], n) for t in self._teacher_names()}
        self._feature_width(widths, width_of(self.spec, n))

    def build(self, ctx: StageContext) -> nn.Module:
        p, logit = self.params, self.params.distill == "logit"
        teachers = {t: rebuild_input(ctx, t, keep_head=logit) for t in self._teacher_names()}
        widths = {t: int(teacher.feature_dim) for t, teacher in teachers.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed(self.spec.train.seed))
            model = self._student_model(ctx.num_classes, widths)
        if p.alpha > 0:
            ctx.aux["teachers"] = {t: frozen(teacher, ctx) for t, teacher in teachers.items()}
        return model

    def _student_model(self, num_classes: int, teachers: dict[str, int]) -> CBDStudentModel:
        """The student network for teachers of these widths (on the current RNG stream)."""
        p = self.params
        backbone = create_model(p.backbone, num_classes, backbone_kwargs=p.backbone_kwargs)
        backbone = backbone.backbone
        width = self._feature_width(teachers, int(backbone.feature_dim))
        proj_dim = width if p.use_projection else None
        adapter_dim = sum(teachers.values()) if p.adapter and p.alpha > 0 else None
        return CBDStudentModel(
            backbone, num_classes, proj_dim=proj_dim, scale=p.scale, adapter_dim=adapter_dim
        )

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        p = self.params
        features, logits, distilled = model(batch.x, distill=True)
        terms = {"ce": (1.0 - p.alpha) * cross_entropy(logits, batch.y)}
        if p.alpha == 0:
            return terms
        teachers = ctx.aux["teachers"].values()
        if p.distill == "logit":
            target = teacher_mean_logits(teachers, batch.x)
            terms["distill"] = p.alpha * kl_distillation(logits, target, p.temperature)
        else:
            target = teacher_target(teachers, batch.x)
            cos = F.cosine_similarity(distilled.float(), target, dim=1)
            terms["distill"] = p.alpha * p.beta * (1.0 - cos).mean()
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
        """The student's feature width, checked against the teachers' (one width each).

        Only plain feature distillation needs it to equal the teachers' concatenated width:
        an adapter maps it there, and logit distillation compares logits.
        """
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
        direct = p.distill == "feature" and not p.adapter
        if p.alpha > 0 and direct and width != target:
            what = "proj_dim" if p.use_projection else "the backbone width (no projection)"
            raise ConfigError(
                f"cbd_student {what}={width} must equal the teachers' concatenated width "
                f"{target} when alpha > 0; set proj_dim={target} or leave it None, or set "
                "adapter=True to distil through a linear map to that width"
            )
        return width


def init_seed(seed: int) -> int:
    """The student's initialisation seed: a hash of its kind and ``TrainSpec.seed``, so it
    differs from every teacher's (teachers seed their init with the plain seed) while data
    order and augmentation keep the plain seed."""
    digest = hashlib.sha256(f"cbd_student/init/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def width_of(spec: StageSpec, num_classes: int) -> int:
    """The pooled-feature width of a stage's backbone, from its untrained skeleton."""
    return int(skeleton(spec, num_classes, keep_head=False).feature_dim)
