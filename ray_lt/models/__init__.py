"""Backbones and classifier heads for long-tailed classification, built by name.

Why it exists: stages name their network as strings (``create_model("resnet32", 100,
head="cosine")``) and get an ``LTModel`` that returns ``(features, logits)``. Everything here is
plain PyTorch; nothing downloads weights or imports Ray.
"""

from __future__ import annotations

from ray_lt.models.factory import BACKBONES, HEADS, LTModel, create_model, freeze
from ray_lt.models.heads import CosineHead, LWSHead, linear_head

__all__ = [
    "BACKBONES",
    "HEADS",
    "CosineHead",
    "LTModel",
    "LWSHead",
    "create_model",
    "freeze",
    "linear_head",
]
