"""Tests for ray_lt.data.samplers: determinism, target class frequencies, class-aware runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_lt.data import SAMPLERS, draw_epoch, lt_counts
from ray_lt.data.samplers import sampler_params
from ray_lt.errors import ConfigError, DataError, UnknownNameError

COUNTS = lt_counts(400, 10, 50)  # 400 ... 8


def _labels(counts=COUNTS, seed=0) -> torch.Tensor:
    labels = np.repeat(np.arange(len(counts)), counts)
    return torch.from_numpy(np.random.default_rng(seed).permutation(labels))


def _gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _class_freq(name: str, labels: torch.Tensor, epochs: int, **kw) -> np.ndarray:
    g = _gen(1)
    idx = torch.cat([draw_epoch(name, labels, 10, g, **kw) for _ in range(epochs)])
    return np.bincount(labels[idx].numpy(), minlength=10) / len(idx)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_shape_range_determinism(name):
    labels = _labels()
    a = draw_epoch(name, labels, 10, _gen(3), epoch=2, total_epochs=5)
    b = draw_epoch(name, labels, 10, _gen(3), epoch=2, total_epochs=5)
    c = draw_epoch(name, labels, 10, _gen(4), epoch=2, total_epochs=5)
    assert a.dtype == torch.int64 and a.shape == labels.shape and a.device == labels.device
    assert int(a.min()) >= 0 and int(a.max()) < len(labels)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_skips_empty_classes(name):
    labels = _labels([30, 0, 12, 0, 5])
    idx = draw_epoch(name, labels, 5, _gen(), epoch=1, total_epochs=2)
    assert set(labels[idx].tolist()) <= {0, 2, 4}
    assert len(idx) == 47


def test_instance_is_a_permutation():
    labels = _labels()
    idx = draw_epoch("instance", labels, 10, _gen())
    assert torch.equal(torch.sort(idx).values, torch.arange(len(labels)))


def _target(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


@pytest.mark.parametrize(
    "name,kw,target",
    [
        ("class_balanced", {}, _target(np.ones(10))),
        ("square_root", {}, _target(np.sqrt(COUNTS))),
        ("progressive", {"epoch": 0, "total_epochs": 4}, _target(np.array(COUNTS, float))),
        (
            "progressive",
            {"epoch": 3, "total_epochs": 4},
            0.25 * _target(np.array(COUNTS, float)) + 0.75 * _target(np.ones(10)),
        ),
        ("progressive", {"epoch": 4, "total_epochs": 4}, _target(np.ones(10))),
        ("class_aware", {"k": 2}, _target(np.ones(10))),
    ],
)
def test_class_frequencies_match_target(name, kw, target):
    labels = _labels()
    freq = _class_freq(name, labels, epochs=60, **kw)  # ~100k draws
    assert np.abs(freq - target).max() < 0.01, (freq.round(3), target.round(3))
    assert np.all(np.abs(freq - target) / target < 0.1)


def test_uniform_within_class():
    labels = _labels()
    g = _gen(2)
    idx = torch.cat([draw_epoch("class_balanced", labels, 10, g) for _ in range(40)]).numpy()
    tail = np.flatnonzero(labels.numpy() == 9)  # the 8 images of the rarest class
    hits = np.bincount(idx, minlength=len(labels))[tail]
    assert hits.min() > 0.8 * hits.mean() and hits.max() < 1.2 * hits.mean()


@pytest.mark.parametrize("k", [1, 2, 5])
def test_class_aware_runs_and_rounds(k):
    labels = _labels()
    idx = draw_epoch("class_aware", labels, 10, _gen(k), k=k)
    cls = labels[idx].numpy()
    full = len(cls) // k * k
    blocks = cls[:full].reshape(-1, k)
    assert (blocks == blocks[:, :1]).all(), "each visit yields k images of one class"
    visits = blocks[:, 0]
    for r in range(len(visits) // 10):
        assert sorted(visits[r * 10 : (r + 1) * 10]) == list(range(10)), "a round visits all"


def test_class_aware_cycles_without_replacement():
    labels = _labels()
    idx = draw_epoch("class_aware", labels, 10, _gen(), k=3).numpy()
    lab = labels.numpy()
    for c, n in enumerate(COUNTS):
        drawn = idx[lab[idx] == c]
        members = set(np.flatnonzero(lab == c).tolist())
        for start in range(0, len(drawn) - n + 1, n):
            chunk = drawn[start : start + n]
            assert set(chunk.tolist()) == members, f"class {c}: each pass shows every image once"
        assert len(set(drawn[:n].tolist())) == min(n, len(drawn))


def test_draw_epoch_rejects_bad_input():
    labels = _labels()
    with pytest.raises(UnknownNameError, match="did you mean 'class_balanced'"):
        draw_epoch("class_balance", labels, 10, _gen())
    with pytest.raises(ConfigError, match=r"'kk'.*valid: k"):
        draw_epoch("class_aware", labels, 10, _gen(), kk=2)
    with pytest.raises(ConfigError, match=r"valid: \(none\)"):
        draw_epoch("instance", labels, 10, _gen(), k=2)
    with pytest.raises(ConfigError, match="k must be"):
        draw_epoch("class_aware", labels, 10, _gen(), k=0)
    with pytest.raises(DataError, match="outside 0..4"):
        draw_epoch("instance", labels, 5, _gen())
    with pytest.raises(ConfigError, match="total_epochs"):
        draw_epoch("progressive", labels, 10, _gen(), epoch=0, total_epochs=0)
    assert sampler_params("class_aware") == ["k"]


def test_empty_labels_give_empty_epoch():
    out = draw_epoch("class_aware", torch.zeros(0, dtype=torch.int64), 3, _gen(), k=2)
    assert out.shape == (0,) and out.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_samplers_on_cuda(name):
    labels = _labels().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    params = {"k": 2} if name == "class_aware" else {}
    idx = draw_epoch(name, labels, 10, g, **params)
    assert idx.device == labels.device and idx.shape == labels.shape
    assert int(idx.min()) >= 0 and int(idx.max()) < len(labels)
    again = draw_epoch(name, labels, 10, torch.Generator(device="cuda").manual_seed(0), **params)
    assert torch.equal(idx, again)
    cpu = draw_epoch(name, labels, 10, _gen(), **params)  # CPU generator, CUDA labels
    assert cpu.device == labels.device
