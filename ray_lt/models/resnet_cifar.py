"""The CIFAR ResNet-32 of the long-tail literature (LDAM-DRW's ``resnet32``) as a backbone.

Why it exists: every CIFAR-LT number ray-lt compares against (docs/methods/) was trained on this
network, and torchvision has no CIFAR ResNet. Its layout, parameter-free "option A" shortcut and
Kaiming-normal initialisation follow LDAM-DRW's ``models/resnet_cifar.py``; module names
(``conv1``, ``bn1``, ``layer1..3``) match it too, so its checkpoints map onto this one minus the
classifier. It returns pooled 64-d features and owns no classifier (heads live in ``heads.py``).
It must not grow options that silently change the architecture: another depth is another key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming_init(module: nn.Module) -> None:
    """LDAM-DRW's init: Kaiming-normal weights on every conv and linear layer, the rest default."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.kaiming_normal_(module.weight)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        extra = planes - in_planes
        self.stride = stride
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A 3-stage CIFAR ResNet (widths 16/32/64) returning globally average-pooled features.

    Args:
        num_blocks: BasicBlocks per stage; ``(5, 5, 5)`` is ResNet-32 (6n+2 layers, n=5).
        zero_init_residual: start the last BN of every block at γ = 0 (Goyal et al.), so each
            block begins as the identity; off by default (LDAM-DRW's init). An init, not an
            architecture: the same weights load either way.
    """

    def __init__(
        self, num_blocks: tuple[int, int, int], *, zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, blocks, stride in zip((16, 32, 64), num_blocks, (1, 2, 2), strict=True):
            layers = []
            for i in range(blocks):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim: int = in_planes
        self.apply(_kaiming_init)
        if zero_init_residual:
            for stage in stages:
                for block in stage:
                    nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # LDAM-DRW pools with a kernel as wide as the map; adaptive pooling is the same on square
        # maps and still gives one vector per image on non-square inputs.
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def resnet32(*, zero_init_residual: bool = False) -> CifarResNet:
    """ResNet-32 for 32x32 inputs: 3 stages of 5 BasicBlocks, a 64-d pooled feature (~0.46M)."""
    return CifarResNet((5, 5, 5), zero_init_residual=zero_init_residual)


def resnet20(*, zero_init_residual: bool = False) -> CifarResNet:
    """ResNet-20 (n=3), the smaller member of the same family."""
    return CifarResNet((3, 3, 3), zero_init_residual=zero_init_residual)


def resnet8(*, zero_init_residual: bool = False) -> CifarResNet:
    """ResNet-8 (n=1): about 4x cheaper than ResNet-32, for smoke runs on CPUs."""
    return CifarResNet((1, 1, 1), zero_init_residual=zero_init_residual)
