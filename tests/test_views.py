"""Crop scales and the second view on both data paths (ray_lt.data.augment, decode, sources and
the engine's ``Batch.view2``).

Two promises are checked here with real crops, not by reading the code: a random resized crop
covers the area range its augmentation names (CBD's 5-100 %, not torchvision's 8-100 %) on the
device and in the CPU decoder alike; and an objective's second view is a crop of the *full*
image drawn independently of the first, not a crop of the first crop. The images encode their
own pixel coordinates (red = x, green = y), so each output tells which box it was cut from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import integrate, stats
from torch import nn

from ray_lt.data import augment_batch, load_dataset
from ray_lt.data.augment import (
    CBD_SCALE,
    IMAGENET_SCALE,
    KEY_VIEW_PHOTOMETRIC,
    MOCO_RATIO,
    MOCO_SCALE,
    resized_crop_boxes,
    streamed_augment,
)
from ray_lt.data.decode import VIEW_SEED_BIT, decode_batch, decode_rows, random_resized_crop_box
from ray_lt.data.sources import StreamSource, row_seeds
from ray_lt.data.spec import DataSpec, Split, clear_cache
from ray_lt.engine import LocalSession, StageRun, run_stage
from ray_lt.engine.epoch import train_epoch
from ray_lt.engine.prepare import prepare
from ray_lt.errors import ConfigError
from ray_lt.objective import Batch, get_objective
from ray_lt.spec import StageSpec, TrainSpec
from ray_lt.stages.baseline import CrossEntropy
from tests.conftest import TINY
from tests.image_trees import make_tree

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
TREE = {"num_classes": 6, "max_per_class": 24, "imbalance": 12.0}  # 56 train images
JPEG_SIZE = (144, 144)  # (width, height) of the coordinate JPEGs: square, as _area_law assumes


# --- what a random resized crop's area should look like ----------------------------------------


def _accept(a: np.ndarray) -> np.ndarray:
    """P(a try of area fraction a fits a square image | a log-uniform aspect in [3/4, 4/3])."""
    cut = 1.0 / MOCO_RATIO[1]  # 3/4: above it only aspects in [a, 1/a] fit
    return np.where(a <= cut, 1.0, -np.log(np.maximum(a, 1e-12)) / math.log(MOCO_RATIO[1]))


def _area_law(scale: tuple[float, float]) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """CDF and mean of a kept box's area fraction on a square image: U[scale] thinned by the
    chance that the try fits (the first try that fits is kept)."""
    lo, hi = scale
    z = integrate.quad(lambda a: float(_accept(np.float64(a))), lo, hi)[0]
    mean = integrate.quad(lambda a: a * float(_accept(np.float64(a))), lo, hi)[0] / z

    def cdf(t: np.ndarray) -> np.ndarray:
        t = np.clip(np.asarray(t, dtype=np.float64), lo, hi)
        cut = 1.0 / MOCO_RATIO[1]
        flat = np.minimum(t, cut) - lo
        g = lambda u: u - u * np.log(u)  # noqa: E731  (an antiderivative of -log u)
        tail = np.where(t > cut, (g(t) - g(cut)) / math.log(MOCO_RATIO[1]), 0.0)
        return (flat + tail) / z

    return cdf, mean


def _check_cbd_areas(areas: np.ndarray) -> None:
    """Kept boxes of a 5-100 % crop: below 8 % occurs, nothing below 5 %, the exact law."""
    cdf, mean = _area_law(CBD_SCALE)
    assert areas.min() < 0.08 and areas.min() >= 0.05 * (1 - 1e-3)
    assert abs(areas.mean() - mean) < 5 * 0.27 / math.sqrt(len(areas))
    assert stats.kstest(areas, cdf).pvalue > 1e-3
    # every try at or below 3/4 of the area fits, so those boxes are U[0.05, 0.75] exactly
    small = areas[areas <= 0.75]
    assert stats.kstest(small, stats.uniform(0.05, 0.70).cdf).pvalue > 1e-3


SIDE = 4096  # large enough that whole-pixel rounding moves an area by < 0.1 %


def _device_boxes(n: int, scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    boxes = resized_crop_boxes(n, SIDE, SIDE, torch.Generator().manual_seed(11), scale=scale)
    h, w = boxes[:, 2].double().numpy(), boxes[:, 3].double().numpy()
    return w, h


def _decode_boxes(n: int, scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    boxes = np.array([random_resized_crop_box(SIDE, SIDE, rng, scale=scale) for _ in range(n)])
    return boxes[:, 2].astype(float), boxes[:, 3].astype(float)


@pytest.mark.parametrize("sampler", [_device_boxes, _decode_boxes], ids=["device", "decode"])
def test_cbd_scale_boxes_cover_5_to_100_percent(sampler):
    w, h = sampler(20_000, CBD_SCALE)
    fallback = (w == SIDE) & (h == SIDE)  # the whole image: no try fitted (p ~ 1e-9 per box)
    assert fallback.sum() <= 2
    _check_cbd_areas((w * h / SIDE**2)[~fallback])
    # the test can tell the scales apart: torchvision's 8-100 % boxes fail it
    w8, h8 = sampler(20_000, IMAGENET_SCALE)
    assert stats.kstest(w8 * h8 / SIDE**2, _area_law(CBD_SCALE)[0]).pvalue < 1e-6


# --- coordinate images and the boxes their crops came from -------------------------------------


def _coordinates(width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3]: red ramps 0-255 left to right, green top to bottom, blue constant."""
    red = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    green = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    rgb = np.stack([red, green, np.full((height, width), 128.0)], axis=2)
    return np.round(rgb).astype(np.uint8)


def _box(crop: np.ndarray, width: int, height: int) -> tuple[float, float, float, float, bool]:
    """(left, top, w, h, flipped) of the source box a [3, S, S] crop (0-255 units) shows.

    Output column j's centre samples source x = left + (j + 1/2) w / S (continuous pixel
    coordinates); a line fitted to the red ramp over the inner columns gives both box edges.
    """
    s = crop.shape[-1]
    j = np.arange(s, dtype=np.float64)[2:-2]
    xs = crop[0].astype(np.float64).mean(0)[2:-2] * (width - 1) / 255.0 + 0.5
    ys = crop[1].astype(np.float64).mean(1)[2:-2] * (height - 1) / 255.0 + 0.5
    bx, ax = np.polyfit(j, xs, 1)
    by, ay = np.polyfit(j, ys, 1)
    x0, x1 = ax - 0.5 * bx, ax + (s - 0.5) * bx
    y0, y1 = ay - 0.5 * by, ay + (s - 0.5) * by
    return min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0), bool(bx < 0)


def _areas(crops: np.ndarray, width: int, height: int) -> np.ndarray:
    """The area fraction of each crop's source box."""
    boxes = np.array([_box(crop, width, height)[:4] for crop in crops])
    return boxes[:, 2] * boxes[:, 3] / (width * height)


def _check_independent_views(
    query: np.ndarray, key: np.ndarray, width: int, height: int, query_scale, key_scale
) -> None:
    """The key is a crop of the full image at its own scale, drawn apart from the query."""
    q = np.array([_box(c, width, height)[:4] for c in query])
    k = np.array([_box(c, width, height)[:4] for c in key])
    qa, ka = q[:, 2] * q[:, 3] / (width * height), k[:, 2] * k[:, 3] / (width * height)
    tol = 0.03  # recovered areas are good to a few per cent of the image
    assert qa.min() < key_scale[0] - tol  # the query's scale reaches below the key's
    assert ka.min() > key_scale[0] - tol and ka.max() < 1 + tol
    for areas, scale in ((qa, query_scale), (ka, key_scale)):
        assert abs(areas.mean() - _area_law(scale)[1]) < 4 * 0.27 / math.sqrt(len(areas)) + tol
    differ = np.abs(q - k).max(1) > 2.0
    assert differ.mean() > 0.95
    # not cut from the query: most keys reach outside the query's box (a key drawn from the
    # query's crop never would, to the recovery's tolerance)
    outside = (
        (k[:, 0] < q[:, 0] - 1.5)
        | (k[:, 1] < q[:, 1] - 1.5)
        | (k[:, 0] + k[:, 2] > q[:, 0] + q[:, 2] + 1.5)
        | (k[:, 1] + k[:, 3] > q[:, 1] + q[:, 3] + 1.5)
    )
    assert outside.mean() > 0.3
    assert abs(np.corrcoef(qa, ka)[0, 1]) < 0.25  # independent draws


# --- the device path ---------------------------------------------------------------------------


def test_rrc05_flip_on_the_device_crops_5_to_100_percent():
    side = 64
    x = torch.from_numpy(_coordinates(side, side).transpose(2, 0, 1).copy())
    x = x[None].expand(1500, -1, -1, -1).contiguous()
    out = augment_batch("rrc05_flip", x, torch.Generator().manual_seed(4), ZERO, ONE)
    areas = _areas((out * 255.0).numpy(), side, side)
    assert areas.min() < 0.075 and areas.min() > 0.045
    _, mean = _area_law(CBD_SCALE)
    assert abs(areas.mean() - mean) < 0.03
    # and rrc_flip keeps torchvision's 8 %
    out8 = augment_batch("rrc_flip", x, torch.Generator().manual_seed(4), ZERO, ONE)
    assert _areas((out8 * 255.0).numpy(), side, side).min() > 0.075


class _MeanColour(nn.Module):
    """(features, logits) from each image's mean colour: a model that costs nothing to train."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = x.mean((2, 3))
        return features, self.fc(features)


class _Probe(CrossEntropy):
    """``ce`` that keeps every batch it trains on (a real objective, left unregistered)."""

    def __init__(self, spec: StageSpec) -> None:
        super().__init__(spec)
        self.seen: list[Batch] = []

    def build(self, ctx):
        return _MeanColour(ctx.num_classes)

    def loss(self, model, batch, ctx):
        self.seen.append(batch)
        return super().loss(model, batch, ctx)


class _ProbeWithKey(_Probe):
    second_view = MOCO_SCALE


def _coordinate_data(side: int = 64):
    """TINY with every training image replaced by the coordinate image; mean 0, std 1."""
    base = load_dataset(TINY)
    n = len(base.train)
    image = _coordinates(side, side).transpose(2, 0, 1)
    images = np.ascontiguousarray(np.broadcast_to(image, (n, *image.shape)))
    train = Split(images, base.train.labels, base.train.source_index)
    return dataclasses.replace(base, train=train, mean=ZERO, std=ONE)


def _device_batches(objective: type[_Probe], epochs: int = 2) -> list[Batch]:
    spec = StageSpec(
        kind="ce",
        data=TINY,
        train=TrainSpec(epochs=epochs, batch_size=32, lr=0.01, augment="rrc_flip"),
        params={"backbone": "resnet8"},
    )
    stage = prepare(
        StageRun(spec=spec, objective=objective, data=_coordinate_data()), LocalSession()
    )
    for epoch in range(epochs):
        train_epoch(stage, stage.model, epoch)
    return stage.objective.seen


def test_device_query_and_key_are_independent_crops_of_the_full_image():
    batches = _device_batches(_ProbeWithKey)
    query = np.concatenate([(b.x * 255.0).numpy() for b in batches])
    key = np.concatenate([b.view2.numpy() for b in batches])
    assert all(b.view2.dtype == torch.uint8 and b.view2.shape == b.raw.shape for b in batches)
    _check_independent_views(query, key, 64, 64, IMAGENET_SCALE, MOCO_SCALE)


def test_no_second_view_unless_the_objective_asks(tmp_path):
    assert all(b.view2 is None for b in _device_batches(_Probe, epochs=1))
    path = tmp_path / "c.jpg"
    Image.fromarray(_coordinates(*JPEG_SIZE)).save(path, quality=95)
    rows = {"path": np.array(["c.jpg"] * 3, dtype=object), "seed": np.arange(3, dtype=np.int64)}
    out = decode_rows(rows, image_root=str(tmp_path), size=32, train=True)
    assert set(out) == {"image"}  # one decode per image, no second one


# --- the streaming path ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coordinate_jpegs(tmp_path_factory) -> str:
    """A folder with one coordinate JPEG (near-lossless: its ramps survive compression)."""
    root = tmp_path_factory.mktemp("coords")
    Image.fromarray(_coordinates(*JPEG_SIZE)).save(root / "c.jpg", quality=100, subsampling=0)
    return str(root)


def _rows(n: int) -> dict[str, np.ndarray]:
    return {"path": np.array(["c.jpg"] * n, dtype=object), "seed": row_seeds(5, n)}


def test_rrc05_flip_streams_with_its_own_scale(coordinate_jpegs):
    assert streamed_augment("rrc05_flip") == (CBD_SCALE, "none")
    assert streamed_augment("rrc_flip") == (IMAGENET_SCALE, "none")
    assert streamed_augment("rrc_flip_jitter") == (IMAGENET_SCALE, "color_jitter")
    assert streamed_augment("crop_flip") == (None, "crop_flip")
    scale, _ = streamed_augment("rrc05_flip")
    out = decode_rows(_rows(800), image_root=coordinate_jpegs, size=48, train=True, scale=scale)
    areas = _areas(out["image"], *JPEG_SIZE)
    assert areas.min() < 0.075 and areas.min() > 0.045


def test_streamed_query_and_key_are_independent_crops_of_the_full_jpeg(coordinate_jpegs):
    out = decode_rows(
        _rows(400), image_root=coordinate_jpegs, size=48, train=True, second_view=MOCO_SCALE
    )
    assert out["view2"].shape == out["image"].shape and out["view2"].dtype == np.uint8
    _check_independent_views(out["image"], out["view2"], *JPEG_SIZE, IMAGENET_SCALE, MOCO_SCALE)
    # each view is its own seeded crop: the row's seed, and the row's seed marked as a view's
    path = [os.path.join(coordinate_jpegs, "c.jpg")]
    seed = int(_rows(400)["seed"][7])
    again = decode_batch(path, size=48, train=True, seeds=[seed | VIEW_SEED_BIT], scale=MOCO_SCALE)
    assert np.array_equal(out["view2"][7], again[0])


def test_stream_source_takes_the_scales_it_is_given(tmp_path):
    make_tree(tmp_path, "imagenet_lt", **TREE)
    clear_cache()
    data = load_dataset(DataSpec("imagenet_lt", image_size=32, placement="stream"), tmp_path)
    cpu = torch.device("cpu")
    assert StreamSource(data.train, data.image_root, 32, cpu).train_crop == IMAGENET_SCALE
    assert StreamSource(data.train, data.image_root, 32, cpu, train_crop=False).train_crop is None
    source = StreamSource(data.train, data.image_root, 32, cpu, CBD_SCALE, MOCO_SCALE)
    assert (source.train_crop, source.second_view) == (CBD_SCALE, MOCO_SCALE)
    with pytest.raises(ConfigError, match="area range"):
        StreamSource(data.train, data.image_root, 32, cpu, train_crop=(0.0, 1.0))
    # the engine hands the stage's scales to the decoder, and the rest to the device
    spec = StageSpec(
        kind="ssd_feature",
        data=DataSpec("imagenet_lt", image_size=32, placement="stream"),
        train=TrainSpec(epochs=1, batch_size=16, lr=0.01, augment="rrc05_flip"),
        params={"backbone": "resnet8", "queue_size": 32},
    )
    stage = prepare(StageRun(spec, get_objective("ssd_feature"), data), LocalSession())
    assert stage.train_source.train_crop == CBD_SCALE and stage.augment == "none"
    assert stage.train_source.second_view == MOCO_SCALE
    ce = StageSpec(kind="ce", data=spec.data, train=spec.train, params={"backbone": "resnet8"})
    stage = prepare(StageRun(ce, get_objective("ce"), data), LocalSession())
    assert stage.train_source.second_view is None


def test_key_augment_names_a_key_view():
    assert set(KEY_VIEW_PHOTOMETRIC) == {"moco_v2", "moco_v2_blur"}
    objective = get_objective("ssd_feature")
    for name in KEY_VIEW_PHOTOMETRIC:
        spec = StageSpec(
            kind="ssd_feature",
            data=TINY,
            train=TrainSpec(batch_size=32),
            params={"key_augment": name},
        )
        objective(spec).validate(np.array([48, 30, 19, 12]))
    bad = StageSpec(
        kind="ssd_feature",
        data=TINY,
        train=TrainSpec(batch_size=32),
        params={"key_augment": "crop_flip"},
    )
    with pytest.raises(ConfigError, match="key_augment 'crop_flip' is not a key view"):
        objective(bad).validate(np.array([48, 30, 19, 12]))


def test_photometric_part_keeps_the_geometry():
    x = torch.from_numpy(_coordinates(32, 32).transpose(2, 0, 1).copy())[None].repeat(64, 1, 1, 1)
    outs = {
        name: augment_batch(name, x, torch.Generator().manual_seed(0), ZERO, ONE)
        for name in KEY_VIEW_PHOTOMETRIC.values()
    }
    for out in outs.values():
        assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 1.0
    # the key's crop + flip come from the data path, so the colour part moves no pixel: an image
    # left un-jittered and un-greyed (about 16 %) comes back as it was
    out = outs["moco_v2_colour"]
    same = torch.isclose(out * 255.0, x.float(), atol=1e-3).flatten(1).all(1)
    assert 0.05 < same.float().mean() < 0.35


# --- through Ray Data --------------------------------------------------------------------------


@pytest.mark.ray
def test_a_streamed_ssd_feature_stage_gets_its_decoded_key_view(ray_session, tmp_path):
    make_tree(tmp_path, "imagenet_lt", **TREE)
    clear_cache()
    data = load_dataset(DataSpec("imagenet_lt", image_size=32, placement="stream"), tmp_path)
    cpu = torch.device("cpu")
    order = torch.arange(len(data.train)).flip(0)
    source = StreamSource(data.train, data.image_root, 32, cpu, IMAGENET_SCALE, MOCO_SCALE)
    got = list(source.train_batches(order, batch_size=20, seed=3))
    assert all(len(b) == 3 for b in got)
    view2 = torch.cat([b[2] for b in got])
    seeds = row_seeds(3, len(order))
    for i in (0, len(order) - 1):
        path = f"{data.image_root}/{data.train.images[int(order[i])]}"
        s = int(seeds[i]) | VIEW_SEED_BIT
        expected = decode_batch([path], size=32, train=True, seeds=[s], scale=MOCO_SCALE)[0]
        assert np.array_equal(view2[i].numpy(), expected)
    plain = StreamSource(data.train, data.image_root, 32, cpu)
    assert all(len(b) == 2 for b in plain.train_batches(order, batch_size=20, seed=3))
    # the whole stage: the engine streams the key view and ssd_feature trains on it
    spec = StageSpec(
        kind="ssd_feature",
        data=DataSpec("imagenet_lt", image_size=32, placement="stream"),
        train=TrainSpec(epochs=1, batch_size=16, lr=0.01, augment="rrc_flip_jitter"),
        params={"backbone": "resnet8", "queue_size": 32},
    )
    summary = run_stage(StageRun(spec, get_objective("ssd_feature"), data), LocalSession())
    assert summary["status"] == "ok" and math.isfinite(summary["history"][-1]["loss"])
