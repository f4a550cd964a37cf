"""CBD's student network and its distillation target (the objectives are in stages/cbd.py)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.models import CosineHead


class CBDStudentModel(nn.Module):
    """Backbone -> [Linear(D, proj_dim) -> ReLU] -> L2-normalise -> fixed-scale cosine classifier.

    ``forward`` returns ``(normalised projected feature, logits)``: the same vector feeds the
    classifier and the distillation loss, as in CBD. With an adapter (TailCalibX's layout, where
    the classifier's width need not match the teachers'), ``forward(x, distill=True)`` also
    returns ``normalise(Linear(feature))``, the vector that is distilled instead.

    Args:
        backbone: pooled-feature network with an int ``feature_dim``.
        num_classes: number of classes C.
        proj_dim: width of the projection, or None for no projection (width = backbone's).
        scale: the cosine classifier's fixed scale.
        adapter_dim: width of the adapter (the teachers' concatenated width), or None for none.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        proj_dim: int | None,
        scale: float,
        adapter_dim: int | None = None,
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
        # Created after the head so that a student without one draws the same initialisation.
        self.adapter: nn.Module | None = None
        if adapter_dim is not None:
            self.adapter = nn.Linear(self.feature_dim, adapter_dim, bias=True)

    def forward(self, x: torch.Tensor, distill: bool = False) -> tuple[torch.Tensor, ...]:
        features = F.normalize(self.projection(self.backbone(x)), dim=1)
        logits = self.head(features)
        if not distill:
            return features, logits
        if self.adapter is None:
            return features, logits, features
        return features, logits, F.normalize(self.adapter(features), dim=1)


@torch.no_grad()
def teacher_target(teachers: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Each teacher's L2-normalised pooled feature, concatenated, L2-normalised again (float32).

    Args:
        teachers: frozen backbones in eval mode, in input order.
        x: the student's (augmented, normalised) batch.
    """
    parts = [F.normalize(t(x).float(), dim=1) for t in teachers]
    return F.normalize(torch.cat(parts, dim=1), dim=1)


@torch.no_grad()
def teacher_mean_logits(teachers: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The mean of the teachers' logits (float32), the target of logit distillation.

    Args:
        teachers: frozen models with their heads (``(features, logits)`` out), in eval mode.
        x: the student's (augmented, normalised) batch.
    """
    return torch.stack([t(x)[1].float() for t in teachers]).mean(0)


def kl_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al.'s term: KL(softmax(t / T) || softmax(s / T)) * T², mean over the batch.

    The T² keeps the gradient's size roughly independent of T, so alpha means the same at any
    temperature.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * (t * t)
