"""Tests for ray_lt.data.decode: JPEG decode, crop boxes, train/eval crops, the Ray Data UDF."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from PIL import Image

from ray_lt.data.decode import (
    RESIZE_RATIO,
    decode_batch,
    decode_rows,
    eval_crop,
    load_rgb,
    random_resized_crop_box,
    train_crop,
)
from ray_lt.errors import DataError

SIZE = 32


def _smooth(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth random RGB content (compresses like a photo), uint8 [h, w, 3]."""
    r = np.random.default_rng(seed)
    small = r.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("img")
    paths = {}
    for name, (w, h) in {"wide": (120, 80), "tall": (70, 110), "big": (400, 300)}.items():
        paths[name] = str(d / f"{name}.jpg")
        Image.fromarray(_smooth(w, h, len(paths))).save(paths[name], quality=90)
    paths["grey"] = str(d / "grey.jpg")
    Image.fromarray(_smooth(90, 60, 7)[..., 0]).save(paths["grey"], quality=90)
    rgba = np.concatenate([_smooth(64, 64, 8), np.full((64, 64, 1), 128, np.uint8)], axis=2)
    paths["rgba"] = str(d / "alpha.png")
    Image.fromarray(rgba, "RGBA").save(paths["rgba"])
    return paths


def test_load_rgb_converts_and_drafts(images):
    for name, path in images.items():
        img = load_rgb(path)
        assert img.mode == "RGB", name
    assert load_rgb(images["grey"]).size == (90, 60)
    assert load_rgb(images["big"]).size == (400, 300)
    assert load_rgb(images["big"], draft_to=(100, 70)).size == (100, 75)  # 1/4 scale
    assert load_rgb(images["big"], draft_to=(101, 70)).size == (200, 150)  # stays >= draft_to
    assert load_rgb(images["rgba"], draft_to=(8, 8)).size == (64, 64)  # PNG: no draft


def test_shapes_and_dtypes(images):
    paths = list(images.values())
    for train in (True, False):
        x = decode_batch(paths, size=SIZE, train=train, seeds=np.arange(len(paths)))
        assert x.shape == (len(paths), 3, SIZE, SIZE) and x.dtype == np.uint8
        assert x.flags.c_contiguous
    rng = np.random.default_rng(0)
    for path in paths:
        img = load_rgb(path)
        assert train_crop(img, SIZE, rng).shape == (3, SIZE, SIZE)
        assert eval_crop(img, SIZE).shape == (3, SIZE, SIZE)
    assert decode_batch([], size=SIZE, train=True, seeds=[]).shape == (0, 3, SIZE, SIZE)


def test_rgba_and_grey_become_rgb(images):
    grey = decode_batch([images["grey"]], size=SIZE, train=False)[0]
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])
    rgba = decode_batch([images["rgba"]], size=SIZE, train=False)[0]
    assert not np.array_equal(rgba[0], rgba[1])  # colour kept, alpha dropped


def test_train_crops_reproducible_and_independent_of_batching(images):
    a, b, big = images["wide"], images["tall"], images["big"]
    ab = decode_batch([a, b, big], size=SIZE, train=True, seeds=[11, 12, 13])
    assert np.array_equal(ab, decode_batch([a, b, big], size=SIZE, train=True, seeds=[11, 12, 13]))
    assert np.array_equal(ab[1], decode_batch([b], size=SIZE, train=True, seeds=[12])[0])
    assert np.array_equal(ab[2], decode_batch([big], size=SIZE, train=True, seeds=[13])[0])
    other = decode_batch([a, b, big], size=SIZE, train=True, seeds=[21, 22, 23])
    for i in range(3):
        assert not np.array_equal(ab[i], other[i])


def test_train_crop_on_lazy_jpeg_matches_decode_batch(images):
    with Image.open(images["big"]) as img:
        x = train_crop(img, SIZE, np.random.default_rng(5))
    assert np.array_equal(x, decode_batch([images["big"]], size=SIZE, train=True, seeds=[5])[0])


def test_eval_crop_is_centred(tmp_path):
    # left half red, right half blue, 80 x 40 -> resized 74 x 37 -> the central 32 x 32
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40, 0] = 255
    arr[:, 40:, 2] = 255
    path = str(tmp_path / "split.png")
    Image.fromarray(arr).save(path)
    x = decode_batch([path], size=SIZE, train=False)[0].astype(int)
    assert round(SIZE * RESIZE_RATIO) == 37
    half = SIZE // 2
    assert (x[0, :, : half - 2] == 255).all() and (x[2, :, : half - 2] == 0).all()
    assert (x[0, :, half + 2 :] == 0).all() and (x[2, :, half + 2 :] == 255).all()
    red_columns = x[0].sum(1) / 255.0  # per row: how many columns' worth of red
    assert np.abs(red_columns - half).max() <= 0.5
    assert np.array_equal(x[0], x[2][:, ::-1])  # mirror-symmetric about the centre


def test_crop_box_bounds():
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (375, 500), (224, 224), (64, 48), (3000, 2000)]:
        for _ in range(300):
            left, top, w, h = random_resized_crop_box(width, height, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            frac = w * h / (width * height)
            assert 0.08 * 0.9 <= frac <= 1.0
            r = w / h
            assert 3 / 4 - 2 / h - 0.01 <= r <= 4 / 3 + 2 / h + 0.01
            assert math.isfinite(r)


def test_crop_box_fallback():
    rng = np.random.default_rng(0)
    # far too wide for any aspect ratio in [3/4, 4/3] at >= 8% of the area: central fallback
    assert random_resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)
    # impossible scale with an in-range aspect ratio: the whole image
    assert random_resized_crop_box(100, 90, rng, scale=(2.0, 3.0)) == (0, 0, 100, 90)


def test_flips_about_half(tmp_path):
    # a horizontal ramp: the crop's mean left-vs-right slope tells a flipped crop from a plain one
    arr = np.repeat(np.repeat(np.linspace(0, 255, 64)[None, :, None], 48, 0), 3, 2)
    path = str(tmp_path / "ramp.png")
    Image.fromarray(arr.astype(np.uint8)).save(path)
    x = decode_batch([path] * 200, size=SIZE, train=True, seeds=np.arange(200)).astype(int)
    flipped = int((x[:, 0, :, 0].mean(1) > x[:, 0, :, -1].mean(1)).sum())
    assert 60 <= flipped <= 140


def test_missing_and_truncated_files_raise_data_error(images, tmp_path):
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(DataError, match="nope.jpg"):
        decode_batch([missing], size=SIZE, train=False)
    with pytest.raises(DataError, match="nope.jpg"):
        load_rgb(missing)
    data = open(images["big"], "rb").read()
    for cut in (len(data) // 2, 10):
        bad = tmp_path / f"truncated{cut}.jpg"
        bad.write_bytes(data[:cut])
        with pytest.raises(DataError, match=f"truncated{cut}.jpg"):
            decode_batch([str(bad)], size=SIZE, train=True, seeds=[0])
        with pytest.raises(DataError, match=f"truncated{cut}.jpg"):
            load_rgb(str(bad))
    with pytest.raises(DataError, match="seeds"):
        decode_batch([images["big"]], size=SIZE, train=True)


def test_decode_rows_passes_columns_through(images):
    root = os.path.dirname(images["big"])
    rel = [os.path.relpath(p, root) for p in images.values()]
    n = len(rel)
    batch = {
        "path": np.array(rel, dtype=object),
        "seed": np.arange(n, dtype=np.int64),
        "label": np.arange(n, dtype=np.int64) * 3,
        "weight": np.linspace(0, 1, n),
    }
    out = decode_rows(batch, image_root=root, size=SIZE, train=True)
    assert set(out) == {"label", "weight", "image"}
    assert out["label"] is batch["label"] and out["weight"] is batch["weight"]
    full = [os.path.join(root, p) for p in rel]
    assert np.array_equal(out["image"], decode_batch(full, size=SIZE, train=True, seeds=range(n)))
    empty = {
        "path": np.array([], dtype=object),
        "seed": np.array([], dtype=np.int64),
        "label": np.array([], dtype=np.int64),
    }
    out = decode_rows(empty, image_root=root, size=SIZE, train=True)
    assert out["image"].shape == (0, 3, SIZE, SIZE) and out["label"].shape == (0,)


def test_reduced_scale_decode_matches_full_scale(images):
    # 400 x 300 at size 32: libjpeg decodes at 1/2 .. 1/8 scale. DCT downscaling differs from
    # the antialiased resize by a few levels on this busy content; a box two output pixels off
    # differs by about 40.
    full = load_rgb(images["big"])
    for seed in range(20):
        with Image.open(images["big"]) as lazy:
            x = train_crop(lazy, SIZE, np.random.default_rng(seed)).astype(int)
        y = train_crop(full, SIZE, np.random.default_rng(seed)).astype(int)
        assert np.abs(x - y).mean() < 12, seed
    with Image.open(images["big"]) as lazy:
        x = eval_crop(lazy, SIZE).astype(int)
    assert np.abs(x - eval_crop(full, SIZE).astype(int)).mean() < 12
