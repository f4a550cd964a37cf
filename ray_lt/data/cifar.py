"""``cifar10_lt`` / ``cifar100_lt``: the literature's long-tailed CIFAR, from the user's files.

Two layouts are read: Parquet in the Hugging Face image layout (``train.parquet`` /
``test.parquet``, PNG bytes + label column) and the torchvision pickle folders
(``cifar-10-batches-py``, ``cifar-100-python``). The long-tailed subset is selected exactly as
LDAM-DRW's ``IMBALANCECIFAR`` does (``splits.select_lt_indices``), so seed 0 trains on the
literature's images. Only the PNGs that are used are decoded. The pickles are read with an
unpickler that builds NumPy arrays and plain containers and refuses everything else: a CIFAR file
must never run code. A damaged file (truncated, empty, foreign, a wrong column, an undecodable
PNG) is one ``DataError`` line naming the file, the damage and the fix, never a library
traceback. This module never downloads anything.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ray_lt.data.spec import DATA_ROOT_ENV, DATASETS, DataSpec, LTDataset, Split
from ray_lt.data.splits import draw_val_indices, lt_counts, select_lt_indices
from ray_lt.errors import DataError

# LDAM-DRW's normalisation, which its CIFAR-10 and CIFAR-100 runs both use.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

CIFAR10_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
CIFAR100_CLASSES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach
couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster
house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road
rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train
trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split()

# What differs between the two variants: class names, n_max, folder names, label column, files.
_VARIANTS: dict[str, dict[str, Any]] = {
    "cifar10_lt": {
        "classes": list(CIFAR10_CLASSES),
        "n_max": 5000,
        "parquet_dir": "cifar10",
        "pickle_dir": "cifar-10-batches-py",
        "label_column": "label",
        "train_files": [f"data_batch_{i}" for i in range(1, 6)],
        "test_file": "test_batch",
    },
    "cifar100_lt": {
        "classes": list(CIFAR100_CLASSES),
        "n_max": 500,
        "parquet_dir": "cifar100",
        "pickle_dir": "cifar-100-python",
        "label_column": "fine_label",
        "train_files": ["train"],
        "test_file": "test",
    },
}

# (module, name) pairs a CIFAR pickle may reference: NumPy's array/scalar rebuilders (old and new
# module paths), and the codec helper protocol-2 pickles use for bytes. Nothing that runs code.
_ALLOWED_GLOBALS = frozenset(
    [(m, "_reconstruct") for m in ("numpy.core.multiarray", "numpy._core.multiarray")]
    + [(m, "scalar") for m in ("numpy.core.multiarray", "numpy._core.multiarray")]
    + [(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "str")]
    + [("builtins", n) for n in ("bytearray", "int", "float", "complex", "bool")]
    + [("__builtin__", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "str")]
)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild NumPy arrays and plain containers, and nothing else."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path  # named in the refusal

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"refusing to unpickle '{module}.{name}' from CIFAR pickle {self.path}: only NumPy "
            "arrays and plain containers are allowed; re-download the dataset from its official "
            "source"
        )


_PICKLE_FIX = "re-download the dataset from its official source"
_PARQUET_FIX = "re-download the dataset or re-export the Parquet files"
# What Pillow raises on bytes that are not a whole, valid image (its plugins parse with struct and
# zlib, and report bad headers as SyntaxError).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


def _cause(err: BaseException) -> str:
    """``Type: first line`` of a library error, for a one-line message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _damage(path: Path, or_else: str = "") -> str:
    """What is wrong with a file its reader rejected: empty, or corrupt (then ``or_else``)."""
    try:
        empty = path.stat().st_size == 0
    except OSError:
        empty = False
    return "is empty (0 bytes)" if empty else f"is truncated or corrupt{or_else}"


def _load_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys, read without running code."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    # Besides EOFError / UnpicklingError / OSError, a damaged pickle makes the unpickler call
    # NumPy's allowed rebuilders with arbitrary arguments, which can raise almost anything
    # (TypeError, KeyError, MemoryError, ...): every one of them means a damaged file.
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"cannot read CIFAR pickle {path}: it {_damage(path, ', or not a CIFAR pickle')} "
            f"({_cause(e)}); {_PICKLE_FIX}"
        ) from e
    if not isinstance(obj, dict):
        raise DataError(
            f"CIFAR pickle {path} holds a {type(obj).__name__}, expected a dict; {_PICKLE_FIX}"
        )
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _pickle_arrays(path: Path, batch: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,3,32,32] u8, labels [N] i64) of one loaded batch, checked to fit together."""
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(
            f"CIFAR pickle {path} has non-numeric 'data' or '{key}' ({_cause(e)}); {_PICKLE_FIX}"
        ) from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"CIFAR pickle {path} has data of shape {data.shape}, not [N, 3072]; {_PICKLE_FIX}"
        )
    if labels.shape != (len(data),):
        raise DataError(
            f"CIFAR pickle {path} has {len(data)} images but '{key}' of shape {labels.shape}; "
            f"{_PICKLE_FIX}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_pickles(folder: Path, name: str = "cifar10_lt") -> dict[str, tuple]:
    """Read a torchvision CIFAR pickle folder: {"train"|"test": (images [N,3,32,32] u8, labels)}.

    Args:
        folder: ``cifar-10-batches-py`` or ``cifar-100-python``.
        name: ``cifar10_lt`` or ``cifar100_lt`` (which files and label key).
    """
    variant = _VARIANTS[name]
    key = "labels" if name == "cifar10_lt" else "fine_labels"
    out = {}
    for split, files in (("train", variant["train_files"]), ("test", [variant["test_file"]])):
        images, labels = [], []
        for fname in files:
            path = Path(folder) / fname
            batch = _load_pickle(path)
            if "data" not in batch or key not in batch:
                raise DataError(
                    f"CIFAR pickle {path} lacks 'data' or '{key}' (has {sorted(batch)}); "
                    f"is this the right dataset for '{name}'?"
                )
            data, batch_labels = _pickle_arrays(path, batch, key)
            images.append(data)
            labels.append(batch_labels)
        out[split] = (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    return out


def _has_parquet(folder: Path) -> bool:
    return (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file()


def _has_pickles(folder: Path, name: str) -> bool:
    variant = _VARIANTS[name]
    return all((folder / f).is_file() for f in [*variant["train_files"], variant["test_file"]])


def _resolve_source(root: str | None, name: str) -> tuple[str, Path]:
    """("parquet" | "pickle", folder) for the first layout found under ``root``.

    Args:
        root: the data root (``--data-root`` or ``$RAY_LT_DATA``), or None.
        name: ``cifar10_lt`` or ``cifar100_lt``.
    """
    fix = f"set {DATA_ROOT_ENV} or pass --data-root to a folder holding it"
    if root is None:
        raise DataError(f"no data root for '{name}': {fix}")
    variant = _VARIANTS[name]
    r = Path(root)
    candidates = [
        ("parquet", r),
        ("pickle", r),
        ("parquet", r / variant["parquet_dir"]),
        ("pickle", r / variant["pickle_dir"]),
    ]
    for kind, folder in candidates:
        if kind == "parquet" and _has_parquet(folder):
            return kind, folder
        if kind == "pickle" and _has_pickles(folder, name):
            return kind, folder
    tried = "; ".join(
        f"{folder}/{{train,test}}.parquet" if kind == "parquet" else f"{folder}/ (pickles)"
        for kind, folder in candidates
    )
    raise DataError(f"'{name}' data not found; tried {tried}; {fix}")


def _parquet_damage(path: Path, err: BaseException) -> DataError:
    """The one-line error for a Parquet file that pyarrow cannot read."""
    return DataError(f"Parquet file {path} {_damage(path)} ({_cause(err)}); {_PARQUET_FIX}")


def _parquet_schema(path: Path) -> Any:
    """The file's Arrow schema (footer only); a damaged file is a ``DataError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise _parquet_damage(path, e) from e


def _parquet_column(path: Path, column: str) -> Any:
    """One column (``a.b`` for a struct field) as a ChunkedArray; damaged pages: ``DataError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=[column]).column(0)
    except (pa.ArrowException, OSError) as e:
        raise _parquet_damage(path, e) from e


def _read_parquet_labels(path: Path, column: str) -> np.ndarray:
    import pyarrow as pa

    schema = _parquet_schema(path)
    if column not in schema.names:
        raise DataError(
            f"{path} has no label column '{column}' (columns: {', '.join(schema.names)}); "
            "is this the right CIFAR variant?"
        )
    kind = schema.field(column).type
    if not pa.types.is_integer(kind):
        raise DataError(
            f"{path} column '{column}' holds {kind}, not integer class labels; {_PARQUET_FIX}"
        )
    labels = _parquet_column(path, column)
    if labels.null_count:
        raise DataError(
            f"{path} column '{column}' has {labels.null_count} missing labels; {_PARQUET_FIX}"
        )
    return labels.to_numpy().astype(np.int64)


def _image_blobs(path: Path, rows: np.ndarray) -> list[bytes | None]:
    """The PNG bytes of ``rows`` from the Hugging Face image column (``img.bytes``)."""
    import pyarrow as pa

    schema = _parquet_schema(path)
    column = next((c for c in ("img", "image") if c in schema.names), None)
    if column is None:
        raise DataError(
            f"{path} has no image column 'img' (columns: {', '.join(schema.names)}); "
            f"{_PARQUET_FIX}"
        )
    kind = schema.field(column).type
    if not (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0):
        raise DataError(
            f"{path} column '{column}' holds {kind}, not the image struct {{bytes, path}}; "
            f"{_PARQUET_FIX}"
        )
    blobs = _parquet_column(path, f"{column}.bytes")
    return blobs.take(pa.array(rows, type=pa.int64())).to_pylist()


def _decode_png(path: Path, row: int, blob: bytes | None) -> np.ndarray:
    """One row's image as uint8 [32, 32, 3]; bytes Pillow cannot decode are a ``DataError``."""
    from PIL import Image, UnidentifiedImageError

    if not blob:
        raise DataError(f"{path} row {row} has no image bytes; {_PARQUET_FIX}")
    try:
        with Image.open(io.BytesIO(blob)) as im:
            pixels = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise DataError(
            f"{path} row {row}: the image bytes are not a PNG or any format Pillow reads; "
            f"{_PARQUET_FIX}"
        ) from None
    except (*_IMAGE_ERRORS, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path} row {row}: the image is truncated or corrupt ({_cause(e)}); {_PARQUET_FIX}"
        ) from e
    if pixels.shape != (32, 32, 3):
        raise DataError(
            f"{path} row {row} is {pixels.shape[:2]}, not a 32x32 image; is this CIFAR?"
        )
    return pixels


def _decode_parquet_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """Decode the PNGs of ``rows`` (in that order) into uint8 [len(rows), 3, 32, 32]."""
    blobs = _image_blobs(path, rows)
    out = np.empty((len(rows), 32, 32, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        out[i] = _decode_png(path, int(rows[i]), blob)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _split(images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> Split:
    return Split(
        images=np.ascontiguousarray(images),
        labels=np.ascontiguousarray(labels, dtype=np.int64),
        source_index=np.ascontiguousarray(rows, dtype=np.int64),
    )


def load_cifar_lt(spec: DataSpec, root: str | None) -> LTDataset:
    """Long-tailed CIFAR-10/100: LT train subset, validation draw, balanced test set.

    Args:
        spec: ``spec.name`` picks CIFAR-10 or -100; ``imbalance``, ``seed`` and
            ``val_per_class`` apply (the other fields are fixed by CIFAR).
        root: data root holding one of the layouts (see :func:`_resolve_source`).
    """
    variant = _VARIANTS[spec.name]
    classes = variant["classes"]
    num_classes = len(classes)
    kind, folder = _resolve_source(root, spec.name)
    if kind == "parquet":
        train_labels = _read_parquet_labels(folder / "train.parquet", variant["label_column"])
        test_labels = _read_parquet_labels(folder / "test.parquet", variant["label_column"])
    else:
        arrays = _read_cifar_pickles(folder, spec.name)
        train_labels, test_labels = arrays["train"][1], arrays["test"][1]
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(
                f"{folder} {split} labels span {labels.min()}..{labels.max()}, "
                f"expected 0..{num_classes - 1}; is this the right CIFAR for '{spec.name}'?"
            )

    counts = lt_counts(variant["n_max"], num_classes, spec.imbalance)
    train_rows = select_lt_indices(train_labels, counts, spec.seed)
    val_rows = draw_val_indices(
        train_labels, train_rows, spec.val_per_class, num_classes, spec.seed
    )
    test_rows = np.arange(len(test_labels), dtype=np.int64)
    if kind == "parquet":
        both = _decode_parquet_rows(
            folder / "train.parquet", np.concatenate([train_rows, val_rows])
        )
        train_images, val_images = both[: len(train_rows)], both[len(train_rows) :]
        test_images = _decode_parquet_rows(folder / "test.parquet", test_rows)
    else:
        train_images = arrays["train"][0][train_rows]
        val_images = arrays["train"][0][val_rows]
        test_images = arrays["test"][0]
    return LTDataset(
        name=spec.name,
        num_classes=num_classes,
        class_names=list(classes),
        train=_split(train_images, train_labels[train_rows], train_rows),
        val=_split(val_images, train_labels[val_rows], val_rows),
        test=_split(test_images, test_labels, test_rows),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
    )


DATASETS.register("cifar10_lt")(load_cifar_lt)
DATASETS.register("cifar100_lt")(load_cifar_lt)
