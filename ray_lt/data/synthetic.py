"""``synthetic_lt``: a learnable long-tailed image dataset generated in well under a second.

It exists so that the quickstart, the CI smoke runs and every test can train real models without a
download. Each class has its own shape, foreground hue, grating (frequency and orientation) and
background tint; each image adds position and size jitter, a random grating phase, brightness and
colour jitter, and pixel noise, so a ResNet-32 has something to learn but learns it within a few
CPU epochs. Deterministic from ``spec.seed`` through ``numpy.random.Generator`` (never global
state); vectorised over images, with one Python loop over classes.
"""

from __future__ import annotations

import numpy as np

from ray_lt.data.spec import DATASETS, DataSpec, LTDataset, Split
from ray_lt.data.splits import lt_counts

SIZE = 32
SHAPES = ("disk", "square", "ring", "cross", "triangle", "diamond", "bars")
_GOLDEN = 0.6180339887498949
# Split ids mixed into the per-(split, class) seeds.
_TRAIN, _VAL, _TEST, _CLASS = 1, 2, 3, 4


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of one shape; returns shape + (3,) in [0, 1]."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack([v, t, p], -1),
            np.stack([q, v, p], -1),
            np.stack([p, v, t], -1),
            np.stack([p, q, v], -1),
            np.stack([t, p, v], -1),
            np.stack([v, p, q], -1),
        ],
        0,
    )
    return np.take_along_axis(table, i[None, ..., None], axis=0)[0]


def _class_params(seed: int, c: int) -> dict[str, float | int]:
    """A class's look: spread systematically over classes, nudged by the seed."""
    rng = np.random.default_rng([seed, _CLASS, c])
    return {
        "shape": c % len(SHAPES),
        "hue": (c * _GOLDEN + rng.uniform(0, 0.05)) % 1.0,
        "size": 0.45 + 0.15 * ((c // len(SHAPES)) % 3) / 2 + rng.uniform(-0.03, 0.03),
        "freq": 1.0 + 1.5 * ((c * 3) % 5) + rng.uniform(-0.2, 0.2),
        "angle": np.pi * ((c * 0.4142135623730951) % 1.0),
        "bg_hue": (c * _GOLDEN + 0.5 + rng.uniform(-0.1, 0.1)) % 1.0,
    }


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean mask [n, H, W] of a shape of radius r [n, 1, 1] centred at dx = dy = 0."""
    ax, ay = np.abs(dx), np.abs(dy)
    name = SHAPES[shape]
    if name == "disk":
        return dx**2 + dy**2 < r**2
    if name == "square":
        return np.maximum(ax, ay) < 0.8 * r
    if name == "ring":
        return np.abs(np.sqrt(dx**2 + dy**2) - 0.75 * r) < 0.25 * r
    if name == "cross":
        return ((ax < 0.3 * r) & (ay < r)) | ((ay < 0.3 * r) & (ax < r))
    if name == "triangle":
        return (dy < 0.7 * r) & (dy > -r + 2.0 * ax)
    if name == "diamond":
        return ax + ay < r
    # "bars": two horizontal bars
    return (ax < r) & (np.abs(ay - 0.5 * r) < 0.22 * r)


def _generate(params: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """n images of one class, uint8 [n, 3, SIZE, SIZE]."""
    if n == 0:
        return np.zeros((0, 3, SIZE, SIZE), dtype=np.uint8)
    grid = (np.arange(SIZE, dtype=np.float32) + 0.5) / SIZE * 2.0 - 1.0
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    col = (n, 1, 1)

    def draw(kind: str, *args: float, size: tuple[int, ...] = col) -> np.ndarray:
        return getattr(rng, kind)(*args, size).astype(np.float32)

    cx, cy = draw("uniform", -0.3, 0.3), draw("uniform", -0.3, 0.3)
    r = params["size"] * draw("uniform", 0.8, 1.2)
    dx, dy = xx[None] - cx, yy[None] - cy
    mask = _shape_mask(params["shape"], dx, dy, r)[:, None]  # [n, 1, H, W]

    angle = params["angle"] + draw("normal", 0.0, 0.15)
    phase = draw("uniform", 0.0, 2 * np.pi)
    wave = np.sin(np.pi * params["freq"] * (dx * np.cos(angle) + dy * np.sin(angle)) + phase)
    texture = (0.65 + 0.35 * wave)[:, None]  # [n, 1, H, W]

    fg = _hsv_to_rgb(
        params["hue"] + rng.normal(0.0, 0.03, n),
        rng.uniform(0.6, 1.0, n),
        rng.uniform(0.75, 1.0, n),
    )
    bg = _hsv_to_rgb(
        params["bg_hue"] + rng.normal(0.0, 0.08, n),
        rng.uniform(0.1, 0.5, n),
        rng.uniform(0.15, 0.55, n),
    )
    fg = fg[:, :, None, None].astype(np.float32)  # [n, 3, 1, 1]
    bg = bg[:, :, None, None].astype(np.float32)
    bg_shade = 1.0 + 0.15 * (xx * draw("normal", 0, 1) + yy * draw("normal", 0, 1))[:, None]
    img = np.where(mask, fg * texture, bg * bg_shade)
    img *= draw("uniform", 0.75, 1.25, size=(n, 1, 1, 1))
    img += 0.08 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.ascontiguousarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _make_split(spec: DataSpec, split_id: int, counts: list[int], params: list[dict]) -> Split:
    images, labels = [], []
    for c, n in enumerate(counts):
        rng = np.random.default_rng([spec.seed, split_id, c])
        images.append(_generate(params[c], n, rng))
        labels.append(np.full(n, c, dtype=np.int64))
    labels_all = np.concatenate(labels)
    return Split(
        images=np.ascontiguousarray(np.concatenate(images)),
        labels=labels_all,
        source_index=np.arange(len(labels_all), dtype=np.int64),
    )


@DATASETS.register("synthetic_lt")
def load_synthetic_lt(spec: DataSpec, root: str | None = None) -> LTDataset:
    """Generate the synthetic long-tailed dataset a spec describes (``root`` is unused).

    Args:
        spec: ``num_classes``, ``max_per_class`` (n_max), ``imbalance``, ``test_per_class``,
            ``val_per_class`` and ``seed`` shape the data.
        root: ignored; present for the ``DATASETS`` signature.
    """
    c = spec.num_classes
    params = [_class_params(spec.seed, k) for k in range(c)]
    train = _make_split(spec, _TRAIN, lt_counts(spec.max_per_class, c, spec.imbalance), params)
    val = _make_split(spec, _VAL, [spec.val_per_class] * c, params)
    test = _make_split(spec, _TEST, [spec.test_per_class] * c, params)
    pixels = train.images.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float32) / 255.0
    mean = tuple(float(m) for m in pixels.mean(axis=1, dtype=np.float64))
    std = tuple(float(s) for s in np.maximum(pixels.std(axis=1, dtype=np.float64), 1e-3))
    width = len(str(c - 1))
    names = [f"{k:0{width}d}_{SHAPES[int(params[k]['shape'])]}" for k in range(c)]
    return LTDataset(
        name=spec.name,
        num_classes=c,
        class_names=names,
        train=train,
        val=val,
        test=test,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )
