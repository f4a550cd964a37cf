"""Tests for ray_lt.data.cifar and ray_lt.data.splits: the literature's CIFAR-LT, to the index.

The real-data tests read ``$RAY_LT_DATA`` (the folder holding ``cifar100/``, e.g.
/work/shared/data) and are skipped when it is unset. The pickle-format tests build their own small
``cifar-10-batches-py`` / ``cifar-100-python`` folders.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from ray_lt.data import DataSpec, load_dataset, lt_counts
from ray_lt.data.cifar import _read_cifar_pickles, _resolve_source, load_cifar_lt
from ray_lt.data.splits import draw_val_indices, select_lt_indices
from ray_lt.errors import DataError
from ray_lt.metrics import shot_groups

DATA = os.environ.get("RAY_LT_DATA")
CIFAR100 = Path(DATA) / "cifar100" if DATA else None
HAVE_DATA = CIFAR100 is not None and (CIFAR100 / "train.parquet").is_file()
SKIP_REASON = (
    "set RAY_LT_DATA to a folder holding cifar100/{train,test}.parquet (/work/shared/data)"
)
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=SKIP_REASON)


def _reference_selection(labels: np.ndarray, counts: list[int], seed: int) -> list[np.ndarray]:
    """LDAM-DRW's IMBALANCECIFAR selection, written out with NumPy's global generator."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        out = []
        for c in np.unique(labels):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            out.append(idx[: counts[c]])
        return out
    finally:
        np.random.set_state(saved)


@pytest.fixture(scope="module")
def train_labels() -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(CIFAR100 / "train.parquet", columns=["fine_label"])[
        "fine_label"
    ].to_numpy()


@pytest.fixture(scope="module")
def cifar100_if100():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # class 0 has no unselected images
        return load_dataset(DataSpec(name="cifar100_lt", imbalance=100, seed=0), DATA)


@needs_data
def test_cifar100_lt_if100_sizes_and_shot_groups(cifar100_if100):
    ds = cifar100_if100
    assert ds.num_classes == 100 and ds.class_names[:2] == ["apple", "aquarium_fish"]
    assert len(ds.train) == 10847
    counts = ds.class_counts
    assert counts[0] == 500 and counts[-1] == 5
    assert np.bincount(shot_groups(counts), minlength=3).tolist() == [35, 35, 30]
    assert ds.train.images.shape == (10847, 3, 32, 32) and ds.train.images.flags.c_contiguous


@needs_data
@pytest.mark.parametrize("imbalance,size", [(200, 9502), (100, 10847), (50, 12608), (10, 19573)])
def test_cifar100_lt_sizes_per_imbalance(train_labels, imbalance, size):
    counts = lt_counts(500, 100, imbalance)
    rows = select_lt_indices(train_labels, counts, seed=0)
    assert len(rows) == len(set(rows.tolist())) == size
    assert np.bincount(train_labels[rows], minlength=100).tolist() == counts


def test_cifar10_lt_if100_size():
    assert sum(lt_counts(5000, 10, 100)) == 12406


@needs_data
def test_selection_matches_the_literature(cifar100_if100, train_labels):
    reference = _reference_selection(train_labels, lt_counts(500, 100, 100), seed=0)
    ours = cifar100_if100.train.source_index
    assert ours[:5].tolist() == reference[0][:5].tolist()  # class 0, in shuffled order
    assert ours[500:505].tolist() == reference[1][:5].tolist()  # class 1: first real subset
    assert np.array_equal(ours, np.concatenate(reference))
    assert np.array_equal(cifar100_if100.train.labels, train_labels[ours])


@needs_data
def test_selection_seed_is_exposed(train_labels):
    counts = lt_counts(500, 100, 100)
    a = select_lt_indices(train_labels, counts, seed=1)
    assert np.array_equal(a, np.concatenate(_reference_selection(train_labels, counts, 1)))
    assert not np.array_equal(a, select_lt_indices(train_labels, counts, seed=0))
    assert np.bincount(train_labels[a], minlength=100).tolist() == counts


@needs_data
def test_validation_split_is_disjoint_and_full_where_possible(cifar100_if100, train_labels):
    ds = cifar100_if100
    val_counts = np.bincount(ds.val.labels, minlength=100)
    available = np.bincount(train_labels, minlength=100) - ds.class_counts
    assert val_counts.tolist() == np.minimum(20, available).tolist()
    assert val_counts[0] == 0 and (val_counts[1:] == 20).all()  # class 0 keeps all 500 images
    assert not set(ds.val.source_index.tolist()) & set(ds.train.source_index.tolist())
    assert np.array_equal(ds.val.labels, train_labels[ds.val.source_index])
    with pytest.warns(RuntimeWarning, match="fewer than 20"):
        again = draw_val_indices(train_labels, ds.train.source_index, 20, 100, seed=0)
    assert np.array_equal(again, ds.val.source_index)


@needs_data
def test_test_set_is_balanced_and_whole(cifar100_if100):
    test = cifar100_if100.test
    assert len(test) == 10000
    assert np.bincount(test.labels, minlength=100).tolist() == [100] * 100
    assert np.array_equal(test.source_index, np.arange(10000))


@needs_data
def test_images_are_the_decoded_pngs(cifar100_if100):
    import pyarrow.parquet as pq
    from PIL import Image

    ds = cifar100_if100
    for split, fname, i in (
        (ds.train, "train.parquet", 777),
        (ds.val, "train.parquet", 33),
        (ds.test, "test.parquet", 4321),
    ):
        row = int(split.source_index[i])
        table = pq.read_table(CIFAR100 / fname, columns=["img"]).slice(row, 1)
        png = table.column("img")[0]["bytes"].as_py()
        direct = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(split.images[i], direct)


@needs_data
def test_root_resolution_accepts_parent_and_folder():
    assert _resolve_source(DATA, "cifar100_lt") == ("parquet", CIFAR100)
    assert _resolve_source(str(CIFAR100), "cifar100_lt") == ("parquet", CIFAR100)


@needs_data
def test_wrong_variant_names_the_label_column():
    with pytest.raises(DataError, match="no label column 'label'.*fine_label"):
        load_cifar_lt(DataSpec(name="cifar10_lt"), str(CIFAR100))


def test_missing_data_names_paths_and_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_dataset(DataSpec(name="cifar10_lt"), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    for path in (tmp_path, tmp_path / "cifar10", tmp_path / "cifar-10-batches-py"):
        assert str(path) in msg
    assert "RAY_LT_DATA" in msg and "--data-root" in msg
    monkeypatch.delenv("RAY_LT_DATA", raising=False)
    with pytest.raises(DataError, match="no data root.*RAY_LT_DATA"):
        load_dataset(DataSpec(name="cifar100_lt"))


def _write(path: Path, obj: object, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _fake_batch(n: int, num_classes: int, seed: int, label_key: bytes) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n)
    return {b"batch_label": b"fake", label_key: labels.tolist(), b"data": data}, data


def test_reads_a_cifar10_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch, data = _fake_batch(12, 10, i, b"labels")
        _write(folder / name, batch, protocol=2)  # the real files are Python 2 pickles
        written.append((data, batch[b"labels"]))
    arrays = _read_cifar_pickles(folder, "cifar10_lt")
    images, labels = arrays["train"]
    assert images.shape == (60, 3, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == sum((w[1] for w in written[:5]), [])
    first = written[0][0][3]  # row 3 of data_batch_1: 1024 red, then green, then blue values
    assert np.array_equal(images[3, 1].reshape(-1), first[1024:2048])
    assert np.array_equal(arrays["test"][0], written[5][0].reshape(-1, 3, 32, 32))
    for root in (tmp_path, folder):
        assert _resolve_source(str(root), "cifar10_lt") == ("pickle", folder)


def test_reads_a_cifar100_pickle_folder_protocol5(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, train_data = _fake_batch(30, 100, 0, b"fine_labels")
    test, _ = _fake_batch(10, 100, 1, b"fine_labels")
    _write(folder / "train", train, protocol=5)
    _write(folder / "test", test, protocol=5)
    images, labels = _read_cifar_pickles(folder, "cifar100_lt")["train"]
    assert np.array_equal(images.reshape(30, -1), train_data)
    assert labels.tolist() == train[b"fine_labels"]


def test_pickle_path_selects_the_same_subset(tmp_path, train_labels_or_skip):
    """A full-size fake cifar-100-python with the real labels selects the parquet path's rows."""
    labels = train_labels_or_skip
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((len(labels), 3072), dtype=np.uint8)
    data[:, :2] = np.stack([np.arange(len(labels)) // 256, np.arange(len(labels)) % 256], 1)
    _write(folder / "train", {b"data": data, b"fine_labels": labels.tolist()}, protocol=5)
    test_labels = np.repeat(np.arange(100), 2)
    test = {b"data": np.zeros((200, 3072), np.uint8), b"fine_labels": test_labels.tolist()}
    _write(folder / "test", test, protocol=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ds = load_cifar_lt(DataSpec(name="cifar100_lt", imbalance=100), str(tmp_path))
    rows = select_lt_indices(labels, lt_counts(500, 100, 100), seed=0)
    assert np.array_equal(ds.train.source_index, rows)
    decoded_rows = ds.train.images[:, 0, 0, 0].astype(np.int64) * 256 + ds.train.images[:, 0, 0, 1]
    assert np.array_equal(decoded_rows, rows)
    assert len(ds.test) == 200 and np.bincount(ds.val.labels, minlength=100)[1] == 20


@pytest.fixture
def train_labels_or_skip() -> np.ndarray:
    if not HAVE_DATA:
        pytest.skip(SKIP_REASON)
    import pyarrow.parquet as pq

    return pq.read_table(CIFAR100 / "train.parquet", columns=["fine_label"])[
        "fine_label"
    ].to_numpy()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 5])
def test_refuses_a_pickle_that_runs_code(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        _write(folder / name, payload, protocol=protocol)
    with pytest.raises(DataError, match=r"refusing to unpickle '(posix|os|nt)\.system'"):
        _read_cifar_pickles(folder, "cifar10_lt")
    with pytest.raises(DataError, match="refusing"):
        load_dataset(DataSpec(name="cifar10_lt", seed=99), tmp_path)
    assert not marker.exists()


def test_refuses_other_globals(tmp_path):
    # eval is pickled by reference (never called): even naming it must be refused
    _write(tmp_path / "data_batch_1", {b"data": eval, b"labels": []}, protocol=4)
    with pytest.raises(DataError, match="'builtins.eval'"):
        _read_cifar_pickles(tmp_path, "cifar10_lt")


def test_truncated_pickle_is_a_data_error(tmp_path):
    for k in range(1, 6):
        (tmp_path / f"data_batch_{k}").write_bytes(b"\x80\x02}q\x00(")
    (tmp_path / "test_batch").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read CIFAR pickle"):
        _read_cifar_pickles(tmp_path, "cifar10_lt")
