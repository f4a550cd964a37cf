"""Tests for ray_lt.data.spec and ray_lt.data.synthetic: specs, registry, learnable data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_lt.data import DATASETS, DataSpec, LTDataset, load_dataset, lt_counts, shot_split
from ray_lt.data.spec import clear_cache
from ray_lt.errors import ConfigError, UnknownNameError


def test_spec_round_trips_through_json():
    spec = DataSpec(name="cifar100_lt", imbalance=50, seed=3)
    d = json.loads(json.dumps(spec.to_dict()))
    assert DataSpec.from_dict(d) == spec
    assert isinstance(spec.imbalance, float)
    assert hash(spec) == hash(DataSpec.from_dict(d))


def test_spec_unknown_key_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'imbalence'.*valid keys: name, imbalance"):
        DataSpec.from_dict({"name": "synthetic_lt", "imbalence": 10})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"imbalance": 0},
        {"imbalance": -1.0},
        {"num_classes": 1},
        {"seed": -1},
        {"seed": 2**32},
        {"name": ""},
    ],
)
def test_spec_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        DataSpec(**kwargs)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(UnknownNameError, match=r"cifar100_lt.*synthetic_lt.*did you mean"):
        load_dataset(DataSpec(name="synthetic"))


def test_lt_counts_profile():
    assert lt_counts(500, 100, 100)[0] == 500 and lt_counts(500, 100, 100)[-1] == 5
    assert sum(lt_counts(500, 100, 100)) == 10847
    assert lt_counts(50, 2, 1.0) == [50, 50]
    with pytest.raises(ConfigError, match="last class"):
        lt_counts(50, 10, 100)


def test_shot_split_groups_by_counts():
    groups = shot_split(np.array([500, 101, 100, 20, 19, 1]))
    assert groups["many"].tolist() == [0, 1]
    assert groups["medium"].tolist() == [2, 3]
    assert groups["few"].tolist() == [4, 5]


def _small(**kw) -> DataSpec:
    return DataSpec(**{"name": "synthetic_lt", "max_per_class": 200, "test_per_class": 50, **kw})


def test_synthetic_shapes_counts_and_splits():
    spec = _small(imbalance=20, num_classes=7, val_per_class=6)
    ds = load_dataset(spec)
    assert isinstance(ds, LTDataset) and ds.num_classes == 7 and len(ds.class_names) == 7
    assert ds.class_counts.tolist() == lt_counts(200, 7, 20)
    assert ds.class_counts.dtype == np.int64
    for split, n in ((ds.train, sum(lt_counts(200, 7, 20))), (ds.val, 42), (ds.test, 350)):
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == np.uint8
        assert split.images.flags.c_contiguous
        assert split.labels.dtype == np.int64 and split.source_index.dtype == np.int64
        assert len(split.source_index) == n
    assert np.bincount(ds.test.labels).tolist() == [50] * 7
    assert np.bincount(ds.val.labels).tolist() == [6] * 7
    assert all(0 < m < 1 for m in ds.mean) and all(0 < s < 1 for s in ds.std)
    # images use the full range and are not constant
    assert ds.train.images.std() > 20


def test_synthetic_is_deterministic_and_seeded():
    clear_cache()
    a = load_dataset(_small(seed=5))
    clear_cache()  # force a second generation rather than a cache hit
    b = load_dataset(_small(seed=5))
    c = load_dataset(_small(seed=6))
    assert a is not b
    assert np.array_equal(a.train.images, b.train.images)
    assert np.array_equal(a.test.images, b.test.images)
    assert not np.array_equal(a.train.images, c.train.images)
    rng_state = np.random.get_state()[1].copy()
    load_dataset(_small(seed=7))
    assert np.array_equal(np.random.get_state()[1], rng_state), "touched global NumPy state"


def test_load_dataset_caches_by_spec():
    spec = _small(seed=11)
    assert load_dataset(spec) is load_dataset(spec)
    assert load_dataset(spec) is not load_dataset(_small(seed=12))


def test_registry_holds_every_builtin():
    assert {"synthetic_lt", "cifar10_lt", "cifar100_lt"} <= set(DATASETS.names())


def _nearest_class_mean_accuracy(ds: LTDataset) -> float:
    """Nearest class mean on 8x8 average-pooled pixels (a deliberately weak classifier)."""

    def feats(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32).reshape(len(x), 3, 8, 4, 8, 4).mean(axis=(3, 5))
        return x.reshape(len(x), -1) / 255.0

    xtr, xte = feats(ds.train.images), feats(ds.test.images)
    means = np.stack([xtr[ds.train.labels == c].mean(0) for c in range(ds.num_classes)])
    dist = (xte**2).sum(1)[:, None] - 2 * xte @ means.T + (means**2).sum(1)[None]
    return float((dist.argmin(1) == ds.test.labels).mean())


@pytest.mark.parametrize("num_classes,imbalance", [(10, 100.0), (10, 10.0), (30, 10.0)])
def test_synthetic_classes_are_learnable(num_classes, imbalance):
    ds = load_dataset(
        DataSpec(num_classes=num_classes, imbalance=imbalance, max_per_class=300, seed=1)
    )
    chance = 1.0 / num_classes
    assert _nearest_class_mean_accuracy(ds) > 3 * chance


def test_synthetic_two_classes_and_extreme_imbalance():
    ds = load_dataset(_small(num_classes=2, imbalance=200))
    assert ds.class_counts.tolist() == [200, 1]
    assert _nearest_class_mean_accuracy(ds) > 0.6
