"""Tests for ray_lt.data.augment: normalisation, batched crop + flip, determinism."""

from __future__ import annotations

import pytest
import torch

from ray_lt.data import AUGMENTS, augment_batch, normalize_batch
from ray_lt.errors import DataError, UnknownNameError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _images(b=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # 1..255 so that a padded (black, 0) pixel can never be confused with image content
    return torch.randint(1, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)


def _gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _denormalize(y: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return torch.round((y * s + m) * 255.0).to(torch.int64)


def test_normalize_values():
    x = _images(4)
    y = normalize_batch(x, MEAN, STD)
    assert y.dtype == torch.float32 and y.shape == x.shape
    expected = (x[1, 2, 5, 7].item() / 255.0 - MEAN[2]) / STD[2]
    assert y[1, 2, 5, 7].item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(_denormalize(y), x.to(torch.int64))


@pytest.mark.parametrize("name", AUGMENTS.names())
def test_every_augment_shape_dtype_determinism(name):
    x = _images()
    a = augment_batch(name, x, _gen(5), MEAN, STD)
    b = augment_batch(name, x, _gen(5), MEAN, STD)
    assert a.dtype == torch.float32 and a.shape == x.shape and a.device == x.device
    assert torch.equal(a, b)


def test_none_equals_normalize():
    x = _images()
    assert torch.equal(augment_batch("none", x, _gen(), MEAN, STD), normalize_batch(x, MEAN, STD))


def _match_window(out: torch.Tensor, padded: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Every (top, left, flipped) whose padded window equals ``out`` exactly."""
    hits = []
    for top in range(9):
        for left in range(9):
            window = padded[:, top : top + 32, left : left + 32]
            for flipped in (False, True):
                if torch.equal(out, window.flip(-1) if flipped else window):
                    hits.append((top, left, flipped))
    return hits


def test_crop_flip_is_a_shifted_possibly_flipped_window():
    x = _images(128)
    y = _denormalize(augment_batch("crop_flip", x, _gen(7), MEAN, STD))
    padded = torch.nn.functional.pad(x.to(torch.int64), (4, 4, 4, 4))
    offsets, flips = set(), 0
    for i in range(len(x)):
        hits = _match_window(y[i], padded[i])
        assert len(hits) == 1, f"sample {i}: {hits}"
        top, left, flipped = hits[0]
        offsets.add((top, left))
        flips += flipped
    assert 40 <= flips <= 88, f"{flips} of 128 flipped; expected about half"
    assert len(offsets) > 30, "offsets should spread over the 81 possible windows"


def test_crop_flip_draws_vary_with_seed():
    x = _images()
    a = augment_batch("crop_flip", x, _gen(1), MEAN, STD)
    b = augment_batch("crop_flip", x, _gen(2), MEAN, STD)
    assert not torch.equal(a, b)


def test_flip_rate_is_about_half():
    # a left-right ramp image: flipped outputs have decreasing columns in the centre rows
    ramp = torch.arange(1, 33, dtype=torch.uint8).view(1, 1, 1, 32).expand(4000, 3, 32, 32)
    y = augment_batch("crop_flip", ramp.contiguous(), _gen(3), MEAN, STD)
    centre = y[:, 0, 16, 8:24]
    flipped = (centre[:, 1:] < centre[:, :-1]).all(dim=1).float().mean().item()
    assert 0.46 < flipped < 0.54


def test_rejects_non_uint8_and_unknown_names():
    with pytest.raises(DataError, match="uint8"):
        augment_batch("crop_flip", torch.zeros(2, 3, 32, 32), _gen(), MEAN, STD)
    with pytest.raises(UnknownNameError, match="crop_flip"):
        augment_batch("cropflip", _images(2), _gen(), MEAN, STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crop_flip_on_cuda_matches_cpu():
    x = _images()
    cpu = augment_batch("crop_flip", x, _gen(9), MEAN, STD)
    gpu = augment_batch("crop_flip", x.cuda(), _gen(9), MEAN, STD)  # CPU generator, CUDA images
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert augment_batch("crop_flip", x.cuda(), g, MEAN, STD).shape == x.shape
