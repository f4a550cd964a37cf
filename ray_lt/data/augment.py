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
    return normalize_batch(_crop_flip_images(x, generator), mean, std)


def _crop_flip_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The geometric half of ``crop_flip``: uint8 in, uint8 out, three draws per image."""
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
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


# --- SimCLR-v2 colour distortion (CBD's "data_aug" teachers, methods/cbd.md) -------------------
#
# SimCLR v2's ``color_jitter_rand`` at strength s: brightness x U[1-0.8s, 1+0.8s] (multiplicative,
# the "simclrv2" variant), contrast and saturation factors U[1-0.8s, 1+0.8s], hue shift
# U[-0.2s, 0.2s] (in turns), the four in a random order per image, each clipped to [0, 1]; the
# whole jitter with probability p_jitter, then greyscale with probability p_grey. Contrast is TF's
# ``adjust_contrast`` (about each image's per-channel mean); saturation and hue are exact
# RGB -> HSV -> RGB conversions (TF's ``adjust_saturation`` / ``adjust_hue``), not a YIQ
# approximation. The per-image order needs no per-sample loop: at each of the 4 positions every op
# is computed for the whole batch and ``torch.where`` keeps the one each image's permutation names
# (about 4x the arithmetic of one pass, but no host sync and fixed shapes).

GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """Float RGB [B, 3, H, W] in [0, 1] -> HSV [B, 3, H, W], hue in turns [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        maxc == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), 0.0)
    return torch.stack((hue, sat, maxc), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV [B, 3, H, W] (hue in turns) -> RGB [B, 3, H, W], the inverse of ``rgb_to_hsv``."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor((5.0, 3.0, 1.0), device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h * 6.0, 6.0)
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _jitter_step(x: torch.Tensor, op: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Apply to each image the one colour op ``op`` names (0 brightness, 1 contrast, 2 saturation,
    3 hue) with its factor, clipped to [0, 1]; saturation and hue share one HSV round trip."""
    bright, contrast, sat, hue = factors
    op = op.view(-1, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    hsv = rgb_to_hsv(x)
    h = torch.where(op == 3, torch.remainder(hsv[:, 0:1] + hue, 1.0), hsv[:, 0:1])
    s = torch.where(op == 2, (hsv[:, 1:2] * sat).clamp(0.0, 1.0), hsv[:, 1:2])
    out = hsv_to_rgb(torch.cat((h, s, hsv[:, 2:3]), 1))
    out = torch.where(op == 1, (x - mean) * contrast + mean, out)
    out = torch.where(op == 0, x * bright, out)
    return out.clamp(0.0, 1.0)


def colour_distort(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    strength: float = 1.0,
    p_jitter: float = 0.8,
    p_grey: float = 0.2,
) -> torch.Tensor:
    """SimCLR-v2 colour distortion of float images in [0, 1], batched, per-image draws.

    Draws, in this order on ``generator``'s device: jitter flags, brightness, contrast and
    saturation factors, hue shifts, the per-image op order, greyscale flags (B each, the order
    4 x B). Images left un-jittered and un-greyed come back unchanged.

    Args:
        x: float RGB images [B, 3, H, W] in [0, 1], on any device.
        generator: source of randomness (may live on another device than x).
        strength: s; brightness / contrast / saturation spread 0.8 s, hue spread 0.2 s.
        p_jitter: probability that an image gets the colour jitter.
        p_grey: probability that an image is then converted to greyscale.
    """
    b, dev = x.shape[0], generator.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        u = torch.rand(b, generator=generator, device=dev)
        return (lo + (hi - lo) * u).to(x.device).view(b, 1, 1, 1)

    jitter = (torch.rand(b, generator=generator, device=dev) < p_jitter).to(x.device)
    spread = 0.8 * strength
    factors = [uniform(max(1.0 - spread, 0.0), 1.0 + spread) for _ in range(3)]
    factors.append(uniform(-0.2 * strength, 0.2 * strength))
    order = torch.rand(b, 4, generator=generator, device=dev).argsort(1).to(x.device)
    grey = (torch.rand(b, generator=generator, device=dev) < p_grey).to(x.device)
    out = x
    for position in range(4):
        out = _jitter_step(out, order[:, position], factors)
    out = torch.where(jitter.view(b, 1, 1, 1), out, x)
    w = torch.tensor(GREY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    grey_img = (out * w).sum(1, keepdim=True).clamp(0.0, 1.0).expand_as(out)
    return torch.where(grey.view(b, 1, 1, 1), grey_img, out)


@AUGMENTS.register("crop_flip_simclr")
def crop_flip_simclr(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``crop_flip``, then SimCLR-v2 colour distortion (strength 1, p 0.8, grey p 0.2), normalise.

    CBD's data_aug teachers (methods/cbd.md): jitter order random per image, clip after each op.
    """
    images = _crop_flip_images(x, generator).float() / 255.0
    out = colour_distort(images, generator)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (out - m) / s


def augment_batch(
    name: str,
    x: torch.Tensor,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Apply the augmentation ``name`` (an ``AUGMENTS`` key) to a uint8 batch; float32 out.

    Args:
        name: ``none``, ``crop_flip``, ``crop_flip_simclr`` (or any other registered key).
        x: uint8 images [B, 3, H, W] on any device.
        generator: source of randomness (may live on another device than x).
        mean: per-channel mean in [0, 1] units (``LTDataset.mean``).
        std: per-channel standard deviation (``LTDataset.std``).
    """
    return AUGMENTS.get(name)(x, generator, mean, std)
