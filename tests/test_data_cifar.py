"""Tests for ray_lt.data.cifar and ray_lt.data.splits: the literature's CIFAR-LT, to the index.

The real-data tests read ``$RAY_LT_DATA`` (the folder holding ``cifar100/``, e.g.
/work/shared/data) and are skipped when it is unset. The pickle-format tests build their own small
``cifar-10-batches-py`` / ``cifar-100-python`` folders, and the damaged-file tests their own small
Hugging Face Parquet files, which they truncate, empty or corrupt: each must be one ``DataError``
line naming the file, and in the sweep CLI one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_lt.data import DataSpec, load_dataset, lt_counts
from ray_lt.data.cifar import (
    _decode_parquet_rows,
    _read_cifar_pickles,
    _read_parquet_labels,
    _resolve_source,
    load_cifar_lt,
)
from ray_lt.data.splits import draw_val_indices, select_lt_indices
from ray_lt.errors import DataError
from ray_lt.metrics import shot_groups

ROOT = Path(__file__).resolve().parent.parent
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


# ---------------------------------------------------------------------------------------------
# Damaged files: one DataError line naming the file, never a library traceback


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(
    path: Path,
    blobs: list,
    labels: list,
    label_column: str = "fine_label",
    image_column: str = "img",
) -> None:
    """A Parquet file in the Hugging Face image layout: {bytes, path} structs plus labels."""
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)], struct)
    table = pa.table({image_column: images, label_column: pa.array(labels, pa.int64())})
    pq.write_table(table, path)


@pytest.fixture
def hf_root(tmp_path: Path) -> Path:
    """A data root holding a small, well-formed ``cifar100/{train,test}.parquet``."""
    folder = tmp_path / "cifar100"
    folder.mkdir()
    _write_parquet(folder / "train.parquet", [_png(i) for i in range(20)], list(range(20)))
    _write_parquet(folder / "test.parquet", [_png(i) for i in range(10)], list(range(10)))
    return tmp_path


def _one_line_naming(info: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: b"not a parquet file\x00\xff" * 50,
    "no-footer": lambda data: data[:-8],
    "no-header": lambda data: data[4:],
}


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_parquet_is_one_line(hf_root: Path, split: str, damage: str) -> None:
    path = hf_root / "cifar100" / f"{split}.parquet"
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(name="cifar100_lt"), hf_root)
    msg = _one_line_naming(info, path)
    what = "is empty (0 bytes)" if damage == "empty" else "is truncated or corrupt"
    assert msg.startswith(f"Parquet file {path} {what} (")
    assert msg.endswith("; re-download the dataset or re-export the Parquet files")


def test_damaged_parquet_in_the_image_decoder(hf_root: Path) -> None:
    """The decoder reopens the file: damage after the labels were read is a DataError too."""
    path = hf_root / "cifar100" / "train.parquet"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="is truncated or corrupt") as info:
        _decode_parquet_rows(path, np.arange(3))
    _one_line_naming(info, path)


def test_corrupt_data_page_is_one_line(tmp_path: Path) -> None:
    """A whole footer with damaged pages fails in the column read, not the schema read."""
    path = tmp_path / "train.parquet"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, 5000).tolist()
    pq.write_table(pa.table({"fine_label": pa.array(labels, pa.int64())}), path)
    data = bytearray(path.read_bytes())
    data[4:1004] = bytes(1000)  # the label page, not the footer: the schema still reads
    path.write_bytes(bytes(data))
    assert pq.read_schema(path).names == ["fine_label"]
    with pytest.raises(DataError, match="is truncated or corrupt") as info:
        _read_parquet_labels(path, "fine_label")
    _one_line_naming(info, path)


def test_parquet_with_the_wrong_label_column(hf_root: Path) -> None:
    path = hf_root / "cifar100" / "train.parquet"
    _write_parquet(path, [_png(1)] * 4, [1, 2, 3, 4], label_column="label")
    with pytest.raises(DataError, match="no label column 'fine_label' .*img, label") as info:
        load_dataset(DataSpec(name="cifar100_lt"), hf_root)
    _one_line_naming(info, path)


@pytest.mark.parametrize(
    ("labels", "damage"),
    [
        (pa.array(["3", "x"]), "holds string, not integer class labels"),
        (pa.array([1.5, 2.0]), "holds double, not integer class labels"),
        (pa.array([1, None], pa.int64()), "has 1 missing labels"),
    ],
    ids=["string", "float", "null"],
)
def test_parquet_with_mistyped_labels(tmp_path: Path, labels: pa.Array, damage: str) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"fine_label": labels}), path)
    with pytest.raises(DataError) as info:
        _read_parquet_labels(path, "fine_label")
    msg = _one_line_naming(info, path)
    assert f"column 'fine_label' {damage}" in msg and "re-export the Parquet files" in msg


@pytest.mark.parametrize(
    ("images", "damage"),
    [
        ({"picture": pa.array([b"x"])}, "has no image column 'img' (columns: picture, label)"),
        ({"img": pa.array([_png(1)])}, "column 'img' holds binary, not the image struct"),
        ({"img": pa.array([{"path": "a.png"}])}, "column 'img' holds struct<path: string>"),
    ],
    ids=["missing", "flat-bytes", "no-bytes-field"],
)
def test_parquet_with_a_wrong_image_column(tmp_path: Path, images: dict, damage: str) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({**images, "label": pa.array([0])}), path)
    with pytest.raises(DataError) as info:
        _decode_parquet_rows(path, np.arange(1))
    msg = _one_line_naming(info, path)
    assert damage in msg and "re-export the Parquet files" in msg


@pytest.mark.parametrize(
    ("blob", "damage"),
    [
        (b"definitely not a png", "the image bytes are not a PNG or any format Pillow reads"),
        (_png(7)[:60], "the image is truncated or corrupt (OSError: image file is truncated)"),
        (_png(7)[:60] + bytes(30) + _png(7)[90:], "the image is truncated or corrupt ("),
        (None, "has no image bytes"),
        (b"", "has no image bytes"),
    ],
    ids=["not-png", "truncated-png", "zeroed-png", "null", "empty"],
)
def test_corrupt_png_in_a_row(tmp_path: Path, blob: bytes | None, damage: str) -> None:
    path = tmp_path / "train.parquet"
    _write_parquet(path, [_png(1), _png(2), blob, _png(3)], [0, 1, 2, 3])
    assert _decode_parquet_rows(path, np.array([3, 0])).shape == (2, 3, 32, 32)
    with pytest.raises(DataError) as info:
        _decode_parquet_rows(path, np.array([0, 2, 1]))
    msg = _one_line_naming(info, path)
    assert f"{path} row 2" in msg and damage in msg and "BytesIO" not in msg
    assert msg.endswith("; re-download the dataset or re-export the Parquet files")


def test_parquet_image_of_the_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    buf = io.BytesIO()
    Image.new("RGB", (16, 8)).save(buf, format="PNG")
    _write_parquet(path, [buf.getvalue()], [0])
    with pytest.raises(DataError, match=r"row 0 is \(8, 16\), not a 32x32 image") as info:
        _decode_parquet_rows(path, np.arange(1))
    _one_line_naming(info, path)


def _pickle_folder(tmp_path: Path) -> Path:
    """A well-formed small ``cifar-100-python`` folder under ``tmp_path``."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for i, name in enumerate(("train", "test")):
        _write(folder / name, _fake_batch(6, 100, i, b"fine_labels")[0], protocol=2)
    return folder


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda data: data[: len(data) // 2], "it is truncated or corrupt, or not a CIFAR pickle"),
        (lambda data: b"", "it is empty (0 bytes) (EOFError: Ran out of input)"),
        (lambda data: b"\x00garbage\xff" * 64, "it is truncated or corrupt, or not a CIFAR"),
        (lambda data: b"not a pickle\n" * 8, "it is truncated or corrupt, or not a CIFAR"),
        (lambda data: data[:2] + bytes(len(data) - 2), "it is truncated or corrupt, or not a"),
    ],
    ids=["truncated", "empty", "garbage", "text", "zeroed"],
)
def test_damaged_pickle_is_one_line(tmp_path: Path, damage, expected: str) -> None:
    folder = _pickle_folder(tmp_path)
    path = folder / "test"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(name="cifar100_lt"), tmp_path)
    msg = _one_line_naming(info, path)
    assert msg.startswith(f"cannot read CIFAR pickle {path}: {expected}")
    assert msg.endswith("; re-download the dataset from its official source")


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ([1, 2, 3], "holds a list, expected a dict"),
        ({b"data": "pixels", b"fine_labels": [0]}, "has non-numeric 'data' or 'fine_labels'"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": ["a", "b"]}, "non-numeric"),
        ({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, "shape (2, 100)"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [0]}, "has 3 images but"),
    ],
    ids=["list", "data-str", "labels-str", "data-shape", "label-count"],
)
def test_pickle_of_the_wrong_shape(tmp_path: Path, batch: object, expected: str) -> None:
    folder = _pickle_folder(tmp_path)
    _write(folder / "train", batch, protocol=2)
    with pytest.raises(DataError) as info:
        _read_cifar_pickles(folder, "cifar100_lt")
    msg = _one_line_naming(info, folder / "train")
    assert expected in msg and "re-download the dataset" in msg


def test_sweep_on_a_truncated_train_parquet_exits_2_with_one_line(hf_root: Path) -> None:
    """The CLI's view of a damaged file: exit 2, one ``error:`` line naming it, no traceback.

    The driver loads the dataset to check the pipeline before Ray starts, so this takes seconds.
    """
    path = hf_root / "cifar100" / "train.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    work = hf_root / "work"
    work.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_lt.sweep",
            str(ROOT / "experiments" / "ce_crt_cifar100_lt.py"),
            "--smoke",
            "--store",
            str(work / "s"),
            "--tracking-uri",
            f"sqlite:///{work / 'm.db'}",
        ],
        cwd=work,
        env={**os.environ, "RAY_LT_DATA": str(hf_root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and str(path) in errors[0], proc.stderr[-2000:]
    assert "truncated or corrupt" in errors[0] and "re-download the dataset" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (work / "s" / "_tune").exists()  # failed before any trial ran
