"""JPEG decode and the ImageNet geometric transforms on CPU: files in, uint8 CHW images out.

Large datasets (ImageNet-LT, iNaturalist) do not fit on the accelerator, so they stream from disk
through a Ray Data ``map_batches`` UDF (``decode_rows``). Only the geometric half of the ImageNet
transforms runs here (``RandomResizedCrop`` + horizontal flip for training, resize + centre crop
for evaluation); the photometric half (colour jitter, normalisation with ``IMAGENET_MEAN`` /
``IMAGENET_STD``) runs later on the device, batched (``ray_lt.data.augment``).

Speed comes from three things: libjpeg decodes at 1/2, 1/4 or 1/8 scale when the crop still has
enough pixels (``Image.draft``); the crop and the resize are one ``Image.resize(..., box=...)``
call; and there is no per-pixel Python. Every random draw comes from a ``numpy`` generator seeded
per image, so a row's crop depends only on its seed, never on how rows were batched or which
worker decoded them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ray_lt.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # eval: resize the shorter side to round(size * RESIZE_RATIO), crop size
DEFAULT_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop area range
# A second view's seed is its row's seed with this bit set: row seeds stay below 2**62
# (``sources.row_seeds``), so a second view never reuses any query's random stream.
VIEW_SEED_BIT = 1 << 62

_DRAFT_SCALES = (8, 4, 2)  # the reduced scales libjpeg can decode at (besides 1)
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _name(img: Image.Image) -> str:
    return getattr(img, "filename", "") or "<in-memory image>"


def _unreadable(path: str, exc: BaseException) -> DataError:
    cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataError(
        f"cannot decode image {path!r} ({type(exc).__name__}: {cause}); "
        "replace or re-download the file, or drop it from the dataset's file list"
    )


def _open(path: str) -> Image.Image:
    """``Image.open`` (reads the header only) with errors turned into ``DataError``."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(
            f"image file {path!r} does not exist; check the dataset root and its file list"
        ) from None
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _is_lazy_jpeg(img: Image.Image) -> bool:
    """True for a JPEG opened from a file whose pixels have not been decoded yet."""
    return img.format == "JPEG" and bool(getattr(img, "tile", None))


def _draft(img: Image.Image, scale: int) -> float:
    """Ask libjpeg to decode ``img`` (lazy JPEG) at 1/``scale``; return the factor applied.

    ``Image.draft`` picks the largest scale in {8, 4, 2, 1} whose result still covers the
    requested size, and ``(W // scale, H // scale)`` makes it pick exactly ``scale``.
    """
    if scale <= 1 or not _is_lazy_jpeg(img):
        return 1.0
    w, h = img.size
    res = img.draft("RGB", (max(1, w // scale), max(1, h // scale)))
    if res is None:
        return 1.0
    return res[1][2] / w  # the original image spans (0, 0, W / s, H / s) of the drafted one


def _rgb(img: Image.Image) -> Image.Image:
    """Decode (if still lazy) and convert to RGB; decode errors name the file."""
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except _READ_ERRORS as exc:
        raise _unreadable(_name(img), exc) from None


def load_rgb(path: str, *, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Open an image file as RGB.

    Args:
        path: the image file (any format Pillow reads).
        draft_to: for JPEGs, let libjpeg decode at the smallest of 1/8, 1/4, 1/2 or full scale
            whose result is still at least ``draft_to`` (width, height); ignored for other formats.

    Raises:
        DataError: the file is missing, unreadable or truncated (the message names it).
    """
    with _open(path) as img:
        if draft_to is not None and _is_lazy_jpeg(img):
            if min(draft_to) < 1:
                raise DataError(f"draft_to must be positive (width, height), got {draft_to}")
            img.draft("RGB", (int(draft_to[0]), int(draft_to[1])))
        return _rgb(img)  # loaded: usable after the file is closed


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h): torchvision ``RandomResizedCrop``'s box sampling on ``rng``.

    Up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio log-uniform in
    ``ratio``, keeping the first that fits, at a uniform position; otherwise the central crop of
    the whole image with its aspect ratio clamped to ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _train_hwc(
    img: Image.Image, size: int, rng: np.random.Generator, area: tuple[float, float]
) -> np.ndarray:
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng, scale=area)
    flip = rng.random() < 0.5
    # decode at the smallest JPEG scale at which the crop still has >= size pixels each way
    scale = next((s for s in _DRAFT_SCALES if min(w, h) >= size * s), 1)
    f = _draft(img, scale)
    rgb = _rgb(img)
    box = (left * f, top * f, (left + w) * f, (top + h) * f)
    out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def _eval_hwc(img: Image.Image, size: int) -> np.ndarray:
    target = round(size * RESIZE_RATIO)
    w, h = img.size
    short = min(w, h)
    scale = next((s for s in _DRAFT_SCALES if short >= target * s), 1)
    f = _draft(img, scale)
    rgb = _rgb(img)
    # resize the shorter side to ``target`` (torchvision truncates the longer one), then crop the
    # centre: one resize of the source window that the crop covers in the resized image
    rw, rh = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
    cl, ct = round((rw - size) / 2), round((rh - size) / 2)  # torchvision's CenterCrop offsets
    sx, sy = w / rw, h / rh  # source pixels per resized pixel
    box = (cl * sx * f, ct * sy * f, (cl + size) * sx * f, (ct + size) * sy * f)
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, box=box))


def train_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
) -> np.ndarray:
    """uint8 [3, size, size]: ``RandomResizedCrop(size, scale)`` (bilinear) + flip p = 0.5.

    A JPEG opened with ``Image.open`` and not yet loaded is decoded at a reduced scale when the
    crop box keeps at least ``size`` pixels each way; the box is drawn on the full-size image
    either way, so the draws (and so the crop's position) do not depend on the scale.
    ``scale`` is the crop's area range as a fraction of the image's (CBD takes 0.05-1).
    """
    return np.ascontiguousarray(_train_hwc(img, size, rng, scale).transpose(2, 0, 1))


def eval_crop(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [3, size, size]: resize the shorter side to ``round(size * RESIZE_RATIO)``
    (bilinear), then centre crop ``size``: ``Resize(256) + CenterCrop(224)`` for 224."""
    return np.ascontiguousarray(_eval_hwc(img, size).transpose(2, 0, 1))


def _decode_one(
    path: str, size: int, rng: np.random.Generator | None, scale: tuple[float, float]
) -> np.ndarray:
    with _open(path) as img:
        try:
            return _eval_hwc(img, size) if rng is None else _train_hwc(img, size, rng, scale)
        except _READ_ERRORS as exc:  # a failure that _rgb did not see (e.g. in resize)
            raise _unreadable(path, exc) from None


def decode_batch(
    paths: Sequence[str],
    *,
    size: int,
    train: bool,
    seeds: Sequence[int] | np.ndarray | None = None,
    scale: tuple[float, float] = DEFAULT_SCALE,
) -> np.ndarray:
    """Decode and crop image files into one uint8 [B, 3, size, size] C-contiguous array.

    Args:
        paths: image files.
        size: output side in pixels.
        train: ``train_crop`` (random) when True, ``eval_crop`` when False.
        seeds: one int per image, required when ``train``: image i draws from
            ``np.random.default_rng(int(seeds[i]))``.
        scale: the training crop's area range (``train_crop``); unused for evaluation.

    Raises:
        DataError: missing seeds, or an image that cannot be decoded (the message names it).
    """
    n = len(paths)
    if train:
        if seeds is None:
            raise DataError("decode_batch(train=True) needs seeds, one int per image")
        if len(seeds) != n:
            raise DataError(
                f"decode_batch got {n} paths but {len(seeds)} seeds; pass one seed per image"
            )
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        rng = np.random.default_rng(int(seeds[i])) if train else None
        out[i] = _decode_one(path, size, rng, scale).transpose(2, 0, 1)
    return out


def _as_str(p: object) -> str:
    return os.fsdecode(p) if isinstance(p, bytes) else str(p)


def decode_rows(
    batch: dict[str, np.ndarray],
    *,
    image_root: str,
    size: int,
    train: bool,
    scale: tuple[float, float] = DEFAULT_SCALE,
    second_view: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """The Ray Data ``map_batches`` body (``batch_format="numpy"``).

    Input columns: ``path`` (relative to ``image_root``), ``seed`` (int64, needed when
    ``train`` or ``second_view``) and any others, which pass through unchanged; ``path`` and
    ``seed`` are dropped and ``image`` (uint8 [B, 3, size, size], from ``decode_batch``: the
    training crop at ``scale`` when ``train``, else the evaluation crop) is added.

    With ``second_view`` (an area range), ``view2`` is added too: a second random resized crop
    + flip of each full image, independent of ``image``'s (its seed is the row's seed with
    ``VIEW_SEED_BIT`` set). A crop of the full image cannot be cut from the first crop, so it
    costs a second decode of every file.
    """
    paths = batch.get("path")
    if paths is None:
        if any(len(v) for v in batch.values()):
            raise DataError("decode_rows needs a 'path' column (image paths relative to the root)")
        paths = np.empty(0, dtype=object)
    seeds = batch.get("seed")
    if (train or second_view is not None) and seeds is None and len(paths):
        raise DataError(
            f"decode_rows(train={train}, second_view={second_view}) needs a 'seed' column "
            "(one int64 per row)"
        )
    full = [os.path.join(image_root, _as_str(p)) for p in paths]
    out = {k: v for k, v in batch.items() if k not in ("path", "seed")}
    image_seeds = seeds if train else None
    out["image"] = decode_batch(full, size=size, train=train, seeds=image_seeds, scale=scale)
    if second_view is not None:
        view_seeds = np.asarray(seeds if seeds is not None else [], dtype=np.int64) | VIEW_SEED_BIT
        out["view2"] = decode_batch(
            full, size=size, train=True, seeds=view_seeds, scale=second_view
        )
    return out
