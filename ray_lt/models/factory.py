"""The one way to build a model: backbone and head registries, ``LTModel``, ``create_model``.

Why it exists: stage objectives name their network as plain strings plus JSON kwargs (these enter
the stage key), so names must map to builders in one place, and an unknown name or keyword must
fail before anything trains. ``LTModel`` gives every stage the same ``(features, logits)`` pair,
which distillation and the exports need. Registration happens here, explicitly by key, so a
rename of a Python function never changes a public name. This module holds no training logic.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ray_lt.errors import ConfigError
from ray_lt.models.heads import CosineHead, LWSHead, linear_head
from ray_lt.models.resnet_cifar import resnet8, resnet20, resnet32
from ray_lt.models.resnet_tv import TORCHVISION_ARCHS, torchvision_backbone
from ray_lt.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
HEADS: Registry[Callable[..., nn.Module]] = Registry("head")

BACKBONES.register("resnet32")(resnet32)
BACKBONES.register("resnet20")(resnet20)
BACKBONES.register("resnet8")(resnet8)
for _arch in TORCHVISION_ARCHS:
    BACKBONES.register(_arch)(functools.partial(torchvision_backbone, _arch))

HEADS.register("linear")(linear_head)
HEADS.register("cosine")(CosineHead)
HEADS.register("lws")(LWSHead)


class LTModel(nn.Module):
    """A backbone and a head; forward returns ``(features [B, D], logits [B, C])``.

    Args:
        backbone: maps images ``[B, 3, H, W]`` to pooled features; has an int ``feature_dim``.
        head: maps ``[B, feature_dim]`` to ``[B, num_classes]``. Stages may replace
            ``model.head`` later (e.g. with ``LWSHead.from_linear(model.head)``).
        num_classes: C; inferred from ``head.num_classes`` or ``head.out_features`` when None.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int | None = None):
        super().__init__()
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int):
            raise ConfigError(
                f"backbone {type(backbone).__name__} has no int feature_dim; set it on the module"
            )
        if num_classes is None:
            num_classes = getattr(head, "num_classes", getattr(head, "out_features", None))
            if not isinstance(num_classes, int):
                raise ConfigError(
                    f"cannot infer num_classes from head {type(head).__name__}; pass num_classes"
                )
        self.backbone = backbone
        self.head = head
        self.feature_dim: int = feature_dim
        self.num_classes: int = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.head(features)


def freeze(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module`` (``requires_grad = False``).

    It does not touch train/eval mode: BatchNorm layers in train mode still update their running
    statistics, so a stage that wants them fixed must also call ``.eval()`` on the module after
    every ``model.train()``.

    Args:
        module: the module to freeze in place.
    """
    for param in module.parameters():
        param.requires_grad_(False)


def _check_kwargs(kind: str, name: str, builder: Callable[..., Any], kwargs: dict, skip: int):
    """Reject keywords the builder does not accept, by name, before building anything."""
    params = list(inspect.signature(builder).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{kind} '{name}' got unknown kwargs {unknown}; accepted: {accepted or 'none'}"
        )


def create_model(
    backbone: str,
    num_classes: int,
    *,
    head: str = "linear",
    backbone_kwargs: dict[str, Any] | None = None,
    head_kwargs: dict[str, Any] | None = None,
) -> LTModel:
    """Build a registered backbone and head into an ``LTModel``.

    Args:
        backbone: a key of ``BACKBONES`` (``"resnet32"``, ``"resnet50"``, ...).
        num_classes: number of classes C (>= 1).
        head: a key of ``HEADS`` (``"linear"``, ``"cosine"``, ``"lws"``).
        backbone_kwargs: keywords for the backbone builder (e.g. ``zero_init_residual``,
            ``weights_path`` for torchvision backbones).
        head_kwargs: keywords for the head builder after ``(in_dim, num_classes)``
            (e.g. ``scale``, ``learn_scale`` for ``"cosine"``).

    Example:
        >>> model = create_model("resnet32", 10, head="cosine", head_kwargs={"scale": 16.0})
        >>> features, logits = model(torch.zeros(2, 3, 32, 32))
        >>> tuple(features.shape), tuple(logits.shape)
        ((2, 64), (2, 10))
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an int >= 1, got {num_classes!r}")
    backbone_kwargs = dict(backbone_kwargs or {})
    head_kwargs = dict(head_kwargs or {})
    backbone_fn = BACKBONES.get(backbone)
    head_fn = HEADS.get(head)
    _check_kwargs("backbone", backbone, backbone_fn, backbone_kwargs, skip=0)
    _check_kwargs("head", head, head_fn, head_kwargs, skip=2)
    net = backbone_fn(**backbone_kwargs)
    classifier = head_fn(net.feature_dim, num_classes, **head_kwargs)
    return LTModel(net, classifier, num_classes)
