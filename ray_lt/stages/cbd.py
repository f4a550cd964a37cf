"""Class-Balanced Distillation (Iscen et al., BMVC 2021): ``cbd_teacher`` and ``cbd_student``.

CBD keeps the whole network learning in the class-balanced stage: a fresh student trains with
class-balanced sampling (set in the student's ``TrainSpec``) on ``(1 - alpha) * CE`` plus
``alpha * beta * (1 - cos)`` between its projected feature and the frozen teachers' features
(methods/cbd.md). One teacher is CBD, several (vanilla and data_aug, different seeds) CBD_ENS.

Teachers are upstream stages, rebuilt here from their spec and weights. They live in
``ctx.aux["teachers"]``, not inside the student: they are never optimised, never wrapped by DDP,
never saved in the student's artifact, and stay in eval mode (the engine's per-epoch
``train()`` only reaches the student). This module must not change the engine's loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.data import augment_batch
from ray_lt.errors import ConfigError
from ray_lt.models import BACKBONES, CosineHead, create_model, freeze
from ray_lt.objective import OBJECTIVES, Batch, StageContext, UpstreamArtifact
from ray_lt.spec import StageSpec

TEACHER_AUGMENTS = ("vanilla", "data_aug")
TEACHER_INPUT = re.compile(r"teacher(0|[1-9][0-9]*)")
DATA_AUG = "crop_flip_simclr"  # ray_lt.data.augment: crop + flip + SimCLR-v2 colour, grey


def _channels_last(x: torch.Tensor, ctx: StageContext) -> torch.Tensor:
    if ctx.device.type == "cuda" and ctx.spec.train.channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


# --- stage 1: teachers -----------------------------------------------------------------------


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
class CBDTeacher:
    """Instance-sampled CE with a fixed-scale cosine head; ``data_aug`` adds colour distortion.

    The data_aug view replaces the engine's one: it is drawn from the raw uint8 batch with the
    stage's generator, so the teacher's augmentation is part of its params (and key) while the
    engine's ``TrainSpec.augment`` stays ``crop_flip``.
    """

    version = "1"
    Params = CBDTeacherParams

    def build(self, params: CBDTeacherParams, ctx: StageContext) -> nn.Module:
        return create_model(
            params.backbone,
            ctx.num_classes,
            head="cosine",
            backbone_kwargs=params.backbone_kwargs,
            head_kwargs={"scale": params.scale, "learn_scale": False},
        )

    def loss(self, params: CBDTeacherParams, model: nn.Module, batch: Batch, ctx: StageContext):
        x = batch.x
        if params.augment == "data_aug":
            x = augment_batch(DATA_AUG, batch.raw, batch.generator, ctx.data.mean, ctx.data.std)
            x = _channels_last(x, ctx)
        _, logits = model(x)
        return {"ce": F.cross_entropy(logits.float(), batch.y)}


# --- stage 2: the student --------------------------------------------------------------------


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


class CBDStudentModel(nn.Module):
    """Backbone -> [Linear(D, proj_dim) -> ReLU] -> L2-normalise -> fixed-scale cosine classifier.

    ``forward`` returns ``(normalised projected feature, logits)``: the same vector feeds the
    classifier and the distillation loss (methods/cbd.md, pitfall 3).

    Args:
        backbone: pooled-feature network with an int ``feature_dim``.
        num_classes: number of classes C.
        proj_dim: width of the projection, or None for no projection (width = backbone's).
        scale: the cosine classifier's fixed scale.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, *, proj_dim: int | None, scale: float
    ) -> None:
        super().__init__()
        self.backbone = backbone
        width = int(backbone.feature_dim)
        if proj_dim is None:
            self.projection: nn.Module = nn.Identity()
        else:
            linear = nn.Linear(width, proj_dim, bias=True)
            nn.init.xavier_uniform_(linear.weight)  # Keras Dense defaults, as in CBD's code
            nn.init.zeros_(linear.bias)
            self.projection = nn.Sequential(linear, nn.ReLU())
        self.feature_dim: int = width if proj_dim is None else proj_dim
        self.num_classes = num_classes
        self.head = CosineHead(self.feature_dim, num_classes, scale=scale, learn_scale=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.normalize(self.projection(self.backbone(x)), dim=1)
        return features, self.head(features)


def teacher_names(ctx: StageContext) -> list[str]:
    """The stage's input names, all ``teacherN``, in numeric order (teacher2 before teacher10)."""
    names = list(ctx.spec.input_dict)
    bad = [n for n in names if not TEACHER_INPUT.fullmatch(n)]
    if bad:
        raise ConfigError(
            f"cbd_student inputs must be named teacher0, teacher1, ...; got {sorted(bad)}; "
            "rename them in the pipeline, e.g. inputs={'teacher0': <cbd_teacher spec>}"
        )
    return sorted(names, key=lambda n: int(n[len("teacher") :]))


def teacher_backbone(name: str, upstream: UpstreamArtifact, num_classes: int) -> nn.Module:
    """Rebuild an upstream stage's backbone from its spec doc and load its stored weights.

    Works for any upstream whose model keeps its backbone under ``backbone.`` (``cbd_teacher``,
    ``ce`` with a linear or cosine head, ...): only the pooled feature is distilled, so the head
    is not rebuilt.

    Args:
        name: the input name (for errors).
        upstream: the upstream artifact (spec doc with ``spec.params``, state dict).
        num_classes: C, for the throwaway head ``create_model`` builds.
    """
    spec = upstream.spec.get("spec", {})
    p = spec.get("params", {})
    model = create_model(
        p.get("backbone", "resnet32"), num_classes, backbone_kwargs=p.get("backbone_kwargs") or {}
    )
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in upstream.state_dict.items() if k.startswith(prefix)}
    kind = spec.get("kind", "?")
    if not weights:
        raise ConfigError(
            f"cbd_student input '{name}' (stage kind '{kind}') has no 'backbone.*' weights; "
            "use a cbd_teacher or ce stage as the teacher"
        )
    try:
        model.backbone.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"cbd_student input '{name}' (stage kind '{kind}'): its weights do not fit backbone "
            f"'{p.get('backbone', 'resnet32')}' ({first}); check the teacher's params"
        ) from exc
    return model.backbone


def _load_teachers(ctx: StageContext, names: list[str]) -> dict[str, nn.Module]:
    missing = [n for n in names if n not in ctx.inputs]
    if missing:
        raise ConfigError(
            f"cbd_student inputs {missing} have no upstream artifact in this run; "
            "run the stage through ray_lt.pipeline so its teachers are trained first"
        )
    # The teachers' throwaway initialisation must not shift the student's seeded init.
    with torch.random.fork_rng(devices=[]):
        teachers = {n: teacher_backbone(n, ctx.inputs[n], ctx.num_classes) for n in names}
    widths = {n: int(t.feature_dim) for n, t in teachers.items()}
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{n}={w}" for n, w in widths.items())
        raise ConfigError(
            f"cbd_student teachers must share one feature width; got {listed}; "
            "use teachers with backbones of the same width"
        )
    return teachers


def _feature_width(params: CBDStudentParams, backbone_width: int, teacher_width: int) -> int:
    """The student's feature width, checked against the distillation target's width."""
    if not params.use_projection:
        if params.proj_dim is not None and params.proj_dim != backbone_width:
            raise ConfigError(
                f"cbd_student proj_dim={params.proj_dim} needs use_projection=True (the "
                f"backbone width is {backbone_width}); set use_projection=True or drop proj_dim"
            )
        width = backbone_width
    else:
        width = params.proj_dim or teacher_width or backbone_width
    if params.alpha > 0 and width != teacher_width:
        what = "proj_dim" if params.use_projection else "the backbone width (no projection)"
        raise ConfigError(
            f"cbd_student {what}={width} must equal the teachers' concatenated width "
            f"{teacher_width} when alpha > 0; set proj_dim={teacher_width} or leave it None"
        )
    return width


@OBJECTIVES.register("cbd_student")
class CBDStudent:
    """A fresh network distilling the normalised, concatenated teacher features; CE on its logits.

    Inputs ``teacher0``, ``teacher1``, ... (any number, concatenated in numeric order); with
    ``alpha == 0`` no teacher is needed and no distillation term is computed.
    """

    version = "1"
    Params = CBDStudentParams

    def validate(self, params: CBDStudentParams, spec: StageSpec) -> None:
        """Driver-side checks before any trial runs: names, count and widths of the teachers."""
        names = [n for n, _ in spec.inputs]
        bad = [n for n in names if not TEACHER_INPUT.fullmatch(n)]
        if bad:
            raise ConfigError(
                f"cbd_student inputs must be named teacher0, teacher1, ...; got {bad}"
            )
        if params.alpha > 0 and not names:
            raise ConfigError(
                f"cbd_student has an empty teacher list with alpha={params.alpha}; name at "
                "least one teacher (e.g. teachers='vanilla1') or set alpha=0"
            )
        widths = {}
        for name, up in spec.inputs:
            p = up.param_dict
            backbone = BACKBONES.get(p.get("backbone", "resnet32"))(**p.get("backbone_kwargs", {}))
            widths[name] = int(backbone.feature_dim)
        if len(set(widths.values())) > 1:
            listed = ", ".join(f"{n}={w}" for n, w in widths.items())
            raise ConfigError(
                f"cbd_student teachers must share one feature width; got {listed}; "
                "use teachers with backbones of the same width"
            )
        target = sum(widths.values())
        if params.alpha > 0 and params.use_projection and params.proj_dim not in (None, target):
            raise ConfigError(
                f"cbd_student proj_dim={params.proj_dim} must equal the teachers' concatenated "
                f"width {target} when alpha > 0; set proj_dim={target} or leave it None"
            )

    def build(self, params: CBDStudentParams, ctx: StageContext) -> nn.Module:
        names = teacher_names(ctx)
        if params.alpha > 0 and not names:
            raise ConfigError(
                "cbd_student needs at least one teacher input (teacher0, ...) when alpha > 0; "
                f"got alpha={params.alpha} and no inputs; add inputs={{'teacher0': <cbd_teacher "
                "spec>}} or set alpha=0 for class-balanced training without distillation"
            )
        teachers = _load_teachers(ctx, names) if names else {}
        teacher_width = sum(int(t.feature_dim) for t in teachers.values())
        backbone = create_model(
            params.backbone, ctx.num_classes, backbone_kwargs=params.backbone_kwargs
        ).backbone
        width = _feature_width(params, int(backbone.feature_dim), teacher_width)
        model = CBDStudentModel(
            backbone,
            ctx.num_classes,
            proj_dim=width if params.use_projection else None,
            scale=params.scale,
        )
        if params.alpha > 0:
            for teacher in teachers.values():
                freeze(teacher)
                teacher.eval().to(ctx.device)
                if ctx.device.type == "cuda" and ctx.spec.train.channels_last:
                    teacher.to(memory_format=torch.channels_last)
            ctx.aux["teachers"] = teachers
        return model

    def loss(self, params: CBDStudentParams, model: nn.Module, batch: Batch, ctx: StageContext):
        features, logits = model(batch.x)
        terms = {"ce": (1.0 - params.alpha) * F.cross_entropy(logits.float(), batch.y)}
        if params.alpha > 0:
            target = teacher_target(ctx.aux["teachers"].values(), batch.x)
            cos = F.cosine_similarity(features.float(), target, dim=1)
            terms["distill"] = params.alpha * params.beta * (1.0 - cos).mean()
        return terms


@torch.no_grad()
def teacher_target(teachers: Any, x: torch.Tensor) -> torch.Tensor:
    """Each teacher's L2-normalised pooled feature, concatenated, L2-normalised again (float32).

    Args:
        teachers: frozen backbones in eval mode, in input order.
        x: the student's (augmented, normalised) batch.
    """
    parts = [F.normalize(t(x).float(), dim=1) for t in teachers]
    return F.normalize(torch.cat(parts, dim=1), dim=1)
