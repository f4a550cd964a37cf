"""Batch augmentations that run where the data lives: uint8 images in, normalised floats out.

Small long-tailed datasets sit on the accelerator as one uint8 tensor (docs/data.md), so
cropping, flipping and normalising happen there, for a whole batch at once, with an explicit
``torch.Generator``: no per-sample Python loop, no CPU round trip, no global random state.
Augmentations are registered by name so a stage (or a CBD data-aug teacher) can name its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

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


# --- SimCLR-v2 colour distortion (CBD's "data_aug" teachers, docs/methods/cbd.md) --------------
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
    hue: float | None = None,
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
        hue: hue spread in turns (default 0.2 s; 0 for torchvision's ``ColorJitter(..., 0)``).
    """
    b, dev = x.shape[0], generator.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        u = torch.rand(b, generator=generator, device=dev)
        return (lo + (hi - lo) * u).to(x.device).view(b, 1, 1, 1)

    jitter = (torch.rand(b, generator=generator, device=dev) < p_jitter).to(x.device)
    spread = 0.8 * strength
    factors = [uniform(max(1.0 - spread, 0.0), 1.0 + spread) for _ in range(3)]
    hue_spread = 0.2 * strength if hue is None else hue
    factors.append(uniform(-hue_spread, hue_spread))
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

    For CBD's data_aug teachers (docs/methods/cbd.md): jitter order random per image, clip after
    each op.
    """
    images = _crop_flip_images(x, generator).float() / 255.0
    out = colour_distort(images, generator)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (out - m) / s


# --- MoCo v2 key view (SSD-LT stage I, docs/methods/ssd_lt.md) -----------------------------------
#
# torchvision's MoCo-v2 pipeline, batched: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, output =
# input size), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, greyscale p 0.2, horizontal flip.
# Differences from torchvision, all deliberate: the crop box is resampled bilinearly by one
# ``affine_grid`` + ``grid_sample`` call for the whole batch (no antialiasing, sub-pixel box
# edges); the jitter is ``colour_distort`` at strength 0.5 (factors U[0.6, 1.4], hue U[-0.1, 0.1],
# random order per image, TF's per-channel-mean contrast and greyscale weights). Gaussian blur
# (sigma U[0.1, 2], p 0.5) is off in ``moco_v2``: at 32 px a 10%-of-size kernel is 3 px wide and
# blurs away most of the image, so CIFAR recipes leave it out; ``moco_v2_blur`` has it.

MOCO_SCALE = (0.2, 1.0)
MOCO_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_RRC_ATTEMPTS = 10  # torchvision's rejection-sampling attempts before the whole-image fallback


def resized_crop_boxes(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = MOCO_SCALE,
    ratio: tuple[float, float] = MOCO_RATIO,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``[B, 4]`` = (top, left, h, w) in pixels, on generator's device.

    As torchvision: up to 10 draws of an area fraction U[scale] and a log-uniform aspect ratio;
    the first box that fits is kept, else the whole image. All attempts are drawn at once.

    Args:
        batch: B.
        height: image height H.
        width: image width W.
        generator: source of randomness; 2 x B x 10 + 2 x B draws, in that order.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's width / height.
    """
    dev = generator.device
    area = (
        height
        * width
        * torch.empty(batch, _RRC_ATTEMPTS, device=dev).uniform_(*scale, generator=generator)
    )
    log_r = torch.empty(batch, _RRC_ATTEMPTS, device=dev).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    w = torch.round(torch.sqrt(area * torch.exp(log_r)))
    h = torch.round(torch.sqrt(area / torch.exp(log_r)))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # the first attempt that fits
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first)[:, 0], torch.full_like(found, width, dtype=w.dtype))
    h = torch.where(found, h.gather(1, first)[:, 0], torch.full_like(found, height, dtype=h.dtype))
    u_top = torch.rand(batch, generator=generator, device=dev)
    u_left = torch.rand(batch, generator=generator, device=dev)
    top = torch.floor(u_top * (height - h + 1))
    left = torch.floor(u_left * (width - w + 1))
    return torch.stack((top, left, h, w), 1)


def _resized_crop_flip(
    x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = MOCO_SCALE
) -> torch.Tensor:
    """Float images -> RandomResizedCrop to the same size, then flip with p 0.5; one sampling."""
    b, _, height, width = x.shape
    boxes = resized_crop_boxes(b, height, width, generator, scale=scale).to(x.device)
    flip = (torch.rand(b, generator=generator, device=generator.device) < 0.5).to(x.device)
    top, left, h, w = boxes.unbind(1)
    # align_corners=False: -1 / +1 are the outer edges of the first / last pixel.
    sx = torch.where(flip, -w / width, w / width)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, 3, height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    sigma: tuple[float, float] = (0.1, 2.0),
    p: float = 0.5,
) -> torch.Tensor:
    """Per-image Gaussian blur (sigma U[sigma], probability p), separable, one grouped conv each.

    The kernel spans about 10% of the image side (odd, at least 3 px), as MoCo v2's 23 px at 224.
    """
    b, c, height, width = x.shape
    dev = generator.device
    s = torch.empty(b, device=dev).uniform_(*sigma, generator=generator).to(x.device)
    on = (torch.rand(b, generator=generator, device=dev) < p).to(x.device)
    radius = max(1, int(0.05 * min(height, width)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(t[None, :] ** 2) / (2 * s[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    flat = x.reshape(1, b * c, height, width)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return torch.where(on.view(b, 1, 1, 1), flat.reshape(b, c, height, width), x)


def moco_v2_images(x: torch.Tensor, generator: torch.Generator, *, blur: bool = False):
    """MoCo v2's key view of uint8 images as floats in [0, 1] (before normalisation).

    Draws in order: crop boxes, flips, ``colour_distort`` (strength 0.5), then blur if on.
    """
    _check(x)
    return _moco_colour(_resized_crop_flip(x.float() / 255.0, generator), generator, blur=blur)


def _moco_colour(images: torch.Tensor, generator: torch.Generator, *, blur: bool) -> torch.Tensor:
    """MoCo v2's photometric part of float images in [0, 1]: jitter p 0.8, grey p 0.2, blur."""
    out = colour_distort(images, generator, strength=0.5, p_jitter=0.8, p_grey=0.2)
    if blur:
        out = gaussian_blur(out, generator)
    return out.clamp(0.0, 1.0)


def _normalize_float(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@AUGMENTS.register("moco_v2")
def moco_v2(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """MoCo v2 without blur (the 32 px default): resized crop, jitter p 0.8, grey p 0.2, flip."""
    return _normalize_float(moco_v2_images(x, generator), mean, std)


@AUGMENTS.register("moco_v2_blur")
def moco_v2_blur(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """MoCo v2 as at 224 px: ``moco_v2`` plus Gaussian blur (sigma 0.1-2, p 0.5)."""
    return _normalize_float(moco_v2_images(x, generator, blur=True), mean, std)


@AUGMENTS.register("moco_v2_colour")
def moco_v2_colour(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``moco_v2`` without its crop and flip, for a view already cropped from the full image
    (an objective's ``second_view``): jitter p 0.8, grey p 0.2, normalise."""
    _check(x)
    return _normalize_float(_moco_colour(x.float() / 255.0, generator, blur=False), mean, std)


@AUGMENTS.register("moco_v2_colour_blur")
def moco_v2_colour_blur(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``moco_v2_blur`` without its crop and flip: ``moco_v2_colour`` plus Gaussian blur."""
    _check(x)
    return _normalize_float(_moco_colour(x.float() / 255.0, generator, blur=True), mean, std)


#: The photometric part of each key-view augmentation: what is left to do on a second view that
#: the data path already cropped and flipped from the full image.
KEY_VIEW_PHOTOMETRIC = {"moco_v2": "moco_v2_colour", "moco_v2_blur": "moco_v2_colour_blur"}


def second_view_images(
    x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float]
) -> torch.Tensor:
    """An independent RandomResizedCrop(``scale``) + flip of each image, uint8 in and out.

    The device path's second view (``Objective.second_view``): drawn from the stored image, as
    the streaming path's CPU decoder draws it from the full JPEG. Rounded back to uint8 so that
    both paths hand the objective the same kind of tensor.
    """
    _check(x)
    images = _resized_crop_flip(x.float() / 255.0, generator, scale=scale)
    return (images * 255.0).round().clamp(0.0, 255.0).to(torch.uint8)


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


# --- ImageNet-style training (the ImageNet-LT / Places-LT / iNat18 recipes) ----------------------
#
# RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, optionally followed by
# ColorJitter(0.4, 0.4, 0.4, 0) (CBE, the decoupling baselines). On the device path the crop is
# taken from the stored image (already resized and centre-cropped at load); on the streaming path
# the CPU decoder takes it from the full JPEG, as torchvision does, and only the photometric part
# runs here: ``STREAM_DEVICE_PART`` names it. Jitter: ``colour_distort`` with factors U[0.6, 1.4],
# no hue, always on, random op order per image; its contrast is about each channel's mean (TF),
# where torchvision blends with the greyscale mean.

IMAGENET_SCALE = (0.08, 1.0)
CBD_SCALE = (0.05, 1.0)  # CBD's crop: 5-100 % of the area


def _jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return colour_distort(images, generator, strength=0.5, p_jitter=1.0, p_grey=0.0, hue=0.0)


@AUGMENTS.register("rrc_flip")
def rrc_flip(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RandomResizedCrop(scale 0.08-1) to the input size + flip, then normalise (ImageNet)."""
    _check(x)
    images = _resized_crop_flip(x.float() / 255.0, generator, scale=IMAGENET_SCALE)
    return _normalize_float(images, mean, std)


@AUGMENTS.register("rrc05_flip")
def rrc05_flip(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RandomResizedCrop(scale 0.05-1) to the input size + flip, then normalise.

    CBD's training crop (docs/methods/cbd.md): a box of 5-100 % of the image's area where
    torchvision's default takes 8-100 %; everything else as ``rrc_flip``.
    """
    _check(x)
    images = _resized_crop_flip(x.float() / 255.0, generator, scale=CBD_SCALE)
    return _normalize_float(images, mean, std)


@AUGMENTS.register("color_jitter")
def color_jitter(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.4, 0) on every image, then normalise; no geometry."""
    _check(x)
    return _normalize_float(_jitter(x.float() / 255.0, generator), mean, std)


@AUGMENTS.register("rrc_flip_jitter")
def rrc_flip_jitter(
    x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``rrc_flip`` then ``color_jitter``: CBE's ImageNet-LT / Places-LT training transform."""
    _check(x)
    images = _resized_crop_flip(x.float() / 255.0, generator, scale=IMAGENET_SCALE)
    return _normalize_float(_jitter(images, generator), mean, std)


#: Augmentations whose geometry the CPU decoder does on a streamed split: the area range of its
#: random resized crop, and the part left for the device. Any other augmentation streams a
#: resized centre crop and runs whole on the device.
STREAM_DEVICE_PART: dict[str, tuple[tuple[float, float], str]] = {
    "rrc_flip": (IMAGENET_SCALE, "none"),
    "rrc_flip_jitter": (IMAGENET_SCALE, "color_jitter"),
    "rrc05_flip": (CBD_SCALE, "none"),
}


def streamed_augment(name: str) -> tuple[tuple[float, float] | None, str]:
    """For a streamed split: the area range of the random resized crop the CPU takes from the
    full JPEG (None: it takes the evaluation crop) and the augmentation left for the device.

    The scale travels with the name so that a CPU crop is the crop the device path would draw.

    Args:
        name: the stage's ``TrainSpec.augment``.
    """
    AUGMENTS.get(name)  # an unknown name fails here, naming the known ones
    if name in STREAM_DEVICE_PART:
        return STREAM_DEVICE_PART[name]
    return None, name
