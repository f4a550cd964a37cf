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
    classifier and the distillation loss, as in CBD.

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


@torch.no_grad()
def teacher_target(teachers: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Each teacher's L2-normalised pooled feature, concatenated, L2-normalised again (float32).

    Args:
        teachers: frozen backbones in eval mode, in input order.
        x: the student's (augmented, normalised) batch.
    """
    parts = [F.normalize(t(x).float(), dim=1) for t in teachers]
    return F.normalize(torch.cat(parts, dim=1), dim=1)
