"""Classifier heads: pooled features ``[B, D]`` -> logits ``[B, C]``.

Why it exists: the methods differ mostly in their classifier. CE and cRT use a linear layer, CBD
a cosine classifier with a fixed scale (docs/methods/cbd.md), SSD-LT's stage II learnable weight
scaling on a frozen linear layer (LWS, Kang et al., docs/methods/ssd_lt.md). Heads are separate
from backbones so a stage can swap one head for another and keep the features. Heads hold no loss
and no training logic; ``factory.py`` registers them by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_lt.errors import ConfigError

_LINEAR_INITS = ("torch", "kaiming")


def linear_head(in_dim: int, num_classes: int, *, init: str = "torch") -> nn.Linear:
    """A linear classifier with bias.

    Args:
        in_dim: feature width D.
        num_classes: number of classes C.
        init: ``"torch"`` keeps PyTorch's default init; ``"kaiming"`` draws the weight
            Kaiming-normal, as LDAM-DRW's ResNet-32 initialises its classifier.
    """
    if init not in _LINEAR_INITS:
        raise ConfigError(f"linear head init '{init}' is unknown; use one of {_LINEAR_INITS}")
    head = nn.Linear(in_dim, num_classes, bias=True)
    if init == "kaiming":
        nn.init.kaiming_normal_(head.weight)
    return head


class CosineHead(nn.Module):
    """Scaled cosine classifier: ``logits = scale * cos(f, w_c)``, so ``|logits| <= |scale|``.

    Args:
        in_dim: feature width D.
        num_classes: number of classes C.
        scale: the temperature sigma (CBD: 20 for 2048-d features; 16 is ray-lt's default for
            64-d CIFAR features). Must be positive.
        learn_scale: train ``scale`` as a Parameter; otherwise it is a fixed buffer (CBD's choice).
    """

    def __init__(
        self, in_dim: int, num_classes: int, *, scale: float = 16.0, learn_scale: bool = False
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ConfigError(f"cosine head scale must be > 0, got {scale}; use e.g. 16.0")
        self.in_dim = in_dim
        self.num_classes = num_classes
        # Glorot-uniform directions as in CBD; the norm is irrelevant because rows are normalised
        # in forward, so a unit norm keeps the effective learning rate of the directions sane.
        weight = torch.empty(num_classes, in_dim)
        nn.init.xavier_uniform_(weight)
        self.weight = nn.Parameter(F.normalize(weight, dim=1))
        value = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
        return self.scale * cos

    def extra_repr(self) -> str:
        learnt = isinstance(self.scale, nn.Parameter)
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}, learn_scale={learnt}"


class LWSHead(nn.Module):
    """Learnable weight scaling: ``logits = scale * (W f + b)`` with W, b frozen, scale per class.

    Only ``scale`` (initialised to 1) is trainable, so balanced re-training can only rescale each
    class's logit (Kang et al., "Decoupling representation and classifier"). Build it from a
    trained linear head with ``LWSHead.from_linear``; a bare ``LWSHead(in_dim, C)`` has a random
    frozen W.

    Args:
        in_dim: feature width D.
        num_classes: number of classes C.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.linear = nn.Linear(in_dim, num_classes, bias=True)
        self.linear.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(num_classes))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> LWSHead:
        """An LWS head whose frozen W, b are copies of ``linear``'s (a missing bias becomes 0).

        Args:
            linear: the trained linear classifier; it is not modified or shared.
        """
        head = cls(linear.in_features, linear.out_features)
        head.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            head.linear.weight.copy_(linear.weight)
            if linear.bias is None:
                head.linear.bias.zero_()
            else:
                head.linear.bias.copy_(linear.bias)
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.linear(features)
