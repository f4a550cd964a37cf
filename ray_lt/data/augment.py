"""Batch augmentations that run where the data lives: uint8 images in, normalised floats out.

Small long-tailed datasets sit on the accelerator as one uint8 tensor (DESIGN.md "Data"), so
cropping, flipping and normalising happen there, for a whole batch at once, with an explicit
``torch.Generator``: no per-sample Python loop, no CPU round trip, no global random state.
Augmentations are registered by name so a stage (or a CBD data-aug teacher) can name its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ray_lt.errors import DataError
from ray_lt.registry import Registry

Augment = Callable[[torch.Tensor, torch.Generator, Sequence[float], Sequence[float]], torch.Tensor]
AUGMENTS = Registry[Augment]("augment")


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise DataError(
            f"augmentations take uint8 images [B, 3, H, W], got {x.dtype} {tuple(x.shape)}"
        )


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 ``(x / 255 - mean) / std``, on x's device.

    Args:
        x: uint8 images.
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.
    """
    _check(x)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


@AUGMENTS.register("none")
def no_augment(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Normalise only (evaluation, or feature extraction)."""
    return normalize_batch(x, mean, std)


def _crop_flip_draws(
    batch: int, pad: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets (top, left) in [0, 2 * pad] and flip flags, on generator.device."""
    dev = generator.device
    top = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=dev)
    left = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=dev)
    flip = torch.rand(batch, generator=generator, device=dev) < 0.5
    return top, left, flip


@AUGMENTS.register("crop_flip")
def crop_flip(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Random crop with 4-pixel zero padding, then horizontal flip with p = 0.5, then normalise.

    The same as torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` on each
    image (padding is black before normalisation), done for the whole batch by one gather.
    """
    _check(x)
    pad = 4
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top, left, flip = (t.to(x.device) for t in _crop_flip_draws(b, pad, generator))
    rows = top[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = left[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
    return normalize_batch(out, mean, std)


def augment_batch(
    name: str,
    x: torch.Tensor,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Apply the augmentation ``name`` (an ``AUGMENTS`` key) to a uint8 batch; float32 out.

    Args:
        name: ``none`` or ``crop_flip`` (or any other registered key).
        x: uint8 images [B, 3, H, W] on any device.
        generator: source of randomness (may live on another device than x).
        mean: per-channel mean in [0, 1] units (``LTDataset.mean``).
        std: per-channel standard deviation (``LTDataset.std``).
    """
    return AUGMENTS.get(name)(x, generator, mean, std)
