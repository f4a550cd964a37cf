"""Split lists of ImageNet-LT, Places-LT and iNaturalist 2018, read from the files users have.

The three datasets are published as lists of image paths plus labels; the images themselves are
the original ImageNet / Places-365 / iNaturalist files, which users place (or symlink) next to the
lists. Under the data root (``$RAY_LT_DATA`` or ``--data-root``) this module expects::

    <root>/ImageNet_LT/                 <root>/Places_LT/               <root>/iNat18/
        ImageNet_LT_train.txt               Places_LT_train.txt             train2018.json
        ImageNet_LT_val.txt                 Places_LT_val.txt               val2018.json
        ImageNet_LT_test.txt                Places_LT_test.txt              train_val2018/
        train/n01440764/...JPEG             data_large/a/airfield/...jpg        Plantae/7477/...jpg
        val/...JPEG                         val_256/...jpg

A ``.txt`` list holds one ``relative/path.jpg label`` per line; ``train2018.json`` and
``val2018.json`` are COCO-style (``images``, ``annotations``, optionally ``categories``). Paths are
relative to the folder holding the lists, which is therefore also the image root.

Only the lists are read here, never the pixels: these datasets hold 20k-440k full-size images that
cannot sit in memory as one array the way CIFAR does, so the training engine decides how to stream
and decode them. What this module does guarantee is that the lists are well formed, that labels
are in range, and (unless ``check_files=False``) that every listed image exists, so a run fails in
seconds with the file and line at fault rather than hours later in a data-loader worker.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ray_lt.data.spec import DATA_ROOT_ENV
from ray_lt.errors import DataError

IMAGE_LIST_DATASETS: tuple[str, ...] = ("imagenet_lt", "places_lt", "inat18")

# Folder under the data root, per dataset.
_FOLDERS = {"imagenet_lt": "ImageNet_LT", "places_lt": "Places_LT", "inat18": "iNat18"}
# The list files of each split, in the order train, val, test.
_TXT_SPLITS = {
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "places_lt": ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
}
# iNat18's official long-tail protocol: train on train2018.json, report on val2018.json.
_JSON_SPLITS = ("train2018.json", "val2018.json")

_INT_RE = re.compile(r"[+-]?[0-9]+")
_SHOW_CHARS = 80
_CHECK_CHUNK = 512
_CHECK_WORKERS = 32
# A label beyond this is a corrupt line, not a class id (iNat18, the largest, has 8,142 classes).
_MAX_LABEL = 10_000_000


@dataclass(frozen=True)
class ImageListSplit:
    """One split as parallel arrays, in the order of its list file.

    ``paths`` are relative to :attr:`ImageLists.image_root` (NumPy unicode array), ``labels`` are
    int64 class ids, ``lines`` say where each row came from: the 1-based line of a ``.txt`` list,
    or the 0-based index into a JSON file's ``annotations`` list. ``source`` is the absolute path
    of the list file ("" for a split the dataset does not have, such as iNat18's val).
    """

    paths: np.ndarray
    labels: np.ndarray
    lines: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ImageLists:
    """The three splits of one dataset, its class count and class names.

    ``num_classes`` is 1 + the largest train label. ``class_names`` come from the JSON
    ``categories`` for iNat18 and from the parent folder of each class's first train image for
    the ``.txt`` formats (e.g. ``n01440764``), falling back to ``str(label)``.
    """

    name: str
    image_root: str
    num_classes: int
    class_names: list[str]
    train: ImageListSplit
    val: ImageListSplit
    test: ImageListSplit

    @property
    def train_counts(self) -> np.ndarray:
        """Training images per class, int64 [num_classes]."""
        return np.bincount(self.train.labels, minlength=self.num_classes).astype(np.int64)


def _fix() -> str:
    return f"set {DATA_ROOT_ENV} or pass --data-root to the folder that holds it"


def _layout(name: str) -> str:
    folder = _FOLDERS[name]
    files = _TXT_SPLITS.get(name, _JSON_SPLITS)
    return f"<root>/{folder}/{{{','.join(files)}}} with the images under <root>/{folder}/"


def _show(text: str) -> str:
    """A line as it may appear in a one-line message: repr'd and cut to ~80 characters."""
    if len(text) > _SHOW_CHARS:
        text = text[:_SHOW_CHARS] + "..."
    return repr(text)


def dataset_folder(name: str, root: str | os.PathLike[str]) -> Path:
    """The folder holding ``name``'s lists and images: ``<root>/ImageNet_LT`` etc.

    Args:
        name: one of :data:`IMAGE_LIST_DATASETS`.
        root: the data root (``$RAY_LT_DATA`` or ``--data-root``).
    """
    if name not in _FOLDERS:
        raise DataError(
            f"unknown image-list dataset {name!r}; choose one of {', '.join(IMAGE_LIST_DATASETS)}"
        )
    return Path(root) / _FOLDERS[name]


def _split(
    paths: Sequence[str], labels: Sequence[int], lines: Sequence[int], source: str
) -> ImageListSplit:
    return ImageListSplit(
        paths=np.array(list(paths), dtype=str),
        labels=np.array(labels, dtype=np.int64),
        lines=np.array(lines, dtype=np.int64),
        source=source,
    )


def _empty_split() -> ImageListSplit:
    return _split([], [], [], "")


def _require_file(path: Path, name: str) -> None:
    if not path.parent.is_dir():
        raise DataError(
            f"'{name}' folder {path.parent} not found; expected {_layout(name)}; {_fix()}"
        )
    if not path.is_file():
        raise DataError(f"'{name}' list {path} not found; expected {_layout(name)}; {_fix()}")


def _read_text(path: Path) -> str:
    """The list's text; unreadable, non-UTF-8 or binary content is one ``DataError`` line."""
    fix = "restore the file from the dataset's release"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"list {path} is not UTF-8 text (byte {e.start}: {e.reason}); it is damaged or "
            f"not a split list: {fix}"
        ) from e
    except OSError as e:
        raise DataError(f"cannot read list {path}: {e}; {fix}") from e
    if "\x00" in text:  # valid UTF-8 can still be binary data; it has no path-label lines
        raise DataError(f"list {path} holds binary data (NUL bytes), not text lines; {fix}")
    return text


# ---------------------------------------------------------------------------------------------
# .txt lists (ImageNet-LT, Places-LT)


def _read_txt(path: Path) -> ImageListSplit:
    """Parse ``relative/path label`` lines; blank lines are skipped but still counted."""
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    for line_no, raw in enumerate(_read_text(path).splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not _INT_RE.fullmatch(parts[1]) or len(parts[1]) > 12:
            raise DataError(
                f"{path.name} line {line_no} is malformed: {_show(line)}; expected "
                f"'relative/path.jpg <integer label>'; fix it ({path})"
            )
        paths.append(parts[0])
        labels.append(int(parts[1]))
        lines.append(line_no)
    return _split(paths, labels, lines, os.path.abspath(path))


def _check_labels(
    split: ImageListSplit, num_classes: int | None, ids: np.ndarray | None = None
) -> None:
    """Raise on the first label outside 0..num_classes-1, naming where it came from.

    Args:
        split: the split to check.
        num_classes: the class count, or None for the train split (which defines it).
        ids: for a JSON split, the image id of each row (for the message).
    """
    labels = split.labels
    top = _MAX_LABEL if num_classes is None else num_classes - 1
    bad = np.flatnonzero((labels < 0) | (labels > top))
    if bad.size == 0:
        return
    i = int(bad[0])
    value = int(labels[i])
    what = "label" if ids is None else "category_id"
    if value < 0:
        valid = "labels must be >= 0"
    elif num_classes is None:
        valid = f"labels above {_MAX_LABEL:,} are not class ids"
    else:
        valid = f"valid labels are 0..{top} (1 + the largest train label)"
    raise DataError(
        f"{_where(split, i, ids)}: {what} {value} is out of range; {valid}; "
        f"fix the list ({split.source})"
    )


def _where(split: ImageListSplit, i: int, ids: np.ndarray | None = None) -> str:
    """'file line N' or 'file annotations[N] (image_id M)' for row ``i`` of ``split``."""
    name = os.path.basename(split.source)
    if ids is not None:
        return f"{name} annotations[{int(split.lines[i])}] (image_id {int(ids[i])})"
    return f"{name} line {int(split.lines[i])}"


def _txt_class_names(train: ImageListSplit, num_classes: int) -> list[str]:
    names = [str(c) for c in range(num_classes)]
    seen: set[int] = set()
    for path, label in zip(train.paths.tolist(), train.labels.tolist(), strict=True):
        if label in seen:
            continue
        seen.add(label)
        parent = PurePosixPath(path.replace("\\", "/")).parent.name
        if parent:
            names[label] = parent
        if len(seen) == num_classes:
            break
    return names


def _read_txt_dataset(name: str, folder: Path) -> ImageLists:
    files = [folder / f for f in _TXT_SPLITS[name]]
    for f in files:
        _require_file(f, name)
    train, val, test = (_read_txt(f) for f in files)
    for f, split in zip(files, (train, val, test), strict=True):
        if len(split) == 0:
            raise DataError(
                f"{f} lists no images (it is empty or blank); restore it from the {name} release"
            )
    _check_labels(train, None)
    num_classes = int(train.labels.max()) + 1
    _check_labels(val, num_classes)
    _check_labels(test, num_classes)
    return ImageLists(
        name=name,
        image_root=os.path.abspath(folder),
        num_classes=num_classes,
        class_names=_txt_class_names(train, num_classes),
        train=train,
        val=val,
        test=test,
    )


# ---------------------------------------------------------------------------------------------
# COCO-style JSON (iNaturalist 2018)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        what = "is empty" if not e.doc.strip() else "is not valid JSON"
        raise DataError(
            f"{path.name} {what} (line {e.lineno} column {e.colno}: {e.msg}); "
            f"restore {path} from the iNaturalist 2018 release"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path.name} is not UTF-8 JSON (byte {e.start}: {e.reason}); restore {path} from "
            "the iNaturalist 2018 release"
        ) from e
    except RecursionError as e:  # json.load recurses per nesting level: garbage like "[[[[..."
        raise DataError(
            f"{path.name} nests too deeply to be COCO-style JSON; restore {path} from the "
            "iNaturalist 2018 release"
        ) from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}; restore it from the iNaturalist release") from e
    if not isinstance(obj, dict):
        raise DataError(
            f"{path.name} holds a JSON {type(obj).__name__}, expected an object with 'images' "
            f"and 'annotations'; {_json_fix(path)}"
        )
    return obj


def _json_fix(path: Path) -> str:
    return f"restore {path} from the iNaturalist 2018 release"


def _entries(obj: dict[str, Any], key: str, path: Path, required: bool = True) -> list[Any]:
    if key not in obj:
        if not required:
            return []
        raise DataError(
            f"{path.name} has no '{key}' list; expected COCO-style JSON; {_json_fix(path)}"
        )
    value = obj[key]
    if not isinstance(value, list):
        raise DataError(
            f"{path.name} '{key}' is a {type(value).__name__}, not a list; {_json_fix(path)}"
        )
    return value


def _field(entry: Any, key: str, kind: type, path: Path, where: str) -> Any:
    """``entry[key]`` checked to be a ``kind`` (bools are not ints)."""
    if not isinstance(entry, dict):
        raise DataError(
            f"{path.name} {where} is a {type(entry).__name__}, not an object; {_json_fix(path)}"
        )
    if key not in entry:
        raise DataError(
            f"{path.name} {where} lacks the key '{key}': {_show(str(entry))}; {_json_fix(path)}"
        )
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(
            f"{path.name} {where} has '{key}' = {_show(repr(value))}, expected "
            f"{'an integer' if kind is int else 'a string'}; {_json_fix(path)}"
        )
    return value


def _read_coco(path: Path) -> tuple[ImageListSplit, np.ndarray, dict[int, str]]:
    """One COCO-style file: its split (images in file order), image ids, category names by id."""
    obj = _load_json(path)
    images = _entries(obj, "images", path)
    annotations = _entries(obj, "annotations", path)

    index_of: dict[int, int] = {}  # image id -> position in "images"
    files: list[str] = []
    ids: list[int] = []
    for i, image in enumerate(images):
        image_id = _field(image, "id", int, path, f"images[{i}]")
        ids.append(image_id)
        files.append(_field(image, "file_name", str, path, f"images[{i}] (id {image_id})"))
        if image_id in index_of:
            raise DataError(
                f"{path.name} images[{i}] repeats the id {image_id} of "
                f"images[{index_of[image_id]}]; every image id must be unique ({path})"
            )
        index_of[image_id] = i

    labels = [-1] * len(images)
    source = [-1] * len(images)  # annotation index per image
    for j, ann in enumerate(annotations):
        image_id = _field(ann, "image_id", int, path, f"annotations[{j}]")
        category = _field(ann, "category_id", int, path, f"annotations[{j}] (image_id {image_id})")
        i = index_of.get(image_id)
        if i is None:
            raise DataError(
                f"{path.name} annotations[{j}] names image_id {image_id}, which is not in "
                f"'images'; restore {path} from the iNaturalist release"
            )
        if not -_MAX_LABEL <= category <= _MAX_LABEL:
            raise DataError(
                f"{path.name} annotations[{j}] (image_id {image_id}): category_id {category} is "
                f"not a class id (at most {_MAX_LABEL:,}); fix the file ({path})"
            )
        if source[i] < 0:  # an image takes the category of its first annotation
            labels[i], source[i] = category, j
    for i, j in enumerate(source):
        if j < 0:
            raise DataError(
                f"{path.name} images[{i}] (id {ids[i]}, {_show(files[i])}) has no "
                f"annotation; every image needs a category ({path})"
            )

    names: dict[int, str] = {}
    for k, cat in enumerate(_entries(obj, "categories", path, required=False)):
        cat_id = _field(cat, "id", int, path, f"categories[{k}]")
        if isinstance(cat, dict) and isinstance(cat.get("name"), str):
            names[cat_id] = cat["name"]
    split = _split(files, labels, source, os.path.abspath(path))
    return split, np.array(ids, dtype=object), names


def _read_inat18(folder: Path) -> tuple[ImageLists, dict[str, np.ndarray]]:
    """iNat18's lists, plus the image id of each row by source file (for messages)."""
    name = "inat18"
    train_file, test_file = (folder / f for f in _JSON_SPLITS)
    _require_file(train_file, name)
    _require_file(test_file, name)
    train, train_ids, train_names = _read_coco(train_file)
    test, test_ids, test_names = _read_coco(test_file)
    for f, split in ((train_file, train), (test_file, test)):
        if len(split) == 0:
            raise DataError(
                f"{f} lists no images ('images' is empty); restore it from the iNaturalist release"
            )
    _check_labels(train, None, train_ids)
    num_classes = int(train.labels.max()) + 1
    _check_labels(test, num_classes, test_ids)
    names = train_names or test_names
    lists = ImageLists(
        name=name,
        image_root=os.path.abspath(folder),
        num_classes=num_classes,
        class_names=[names.get(c, str(c)) for c in range(num_classes)],
        train=train,
        val=_empty_split(),
        test=test,
    )
    return lists, {train.source: train_ids, test.source: test_ids}


# ---------------------------------------------------------------------------------------------
# Image existence


def _exist(paths: list[str]) -> list[bool]:
    return [os.path.isfile(p) for p in paths]


def _check_images(lists: ImageLists, ids: dict[str, np.ndarray]) -> None:
    """Raise on the first listed image (train, then val, then test) that is not a file.

    ``os.path.isfile`` is one ``stat`` per image; on a network disk each costs a round trip, so
    the checks run on a thread pool (``stat`` releases the GIL) in chunks that keep list order.
    """
    splits = [s for s in (lists.train, lists.val, lists.test) if len(s)]
    full = [os.path.join(lists.image_root, p) for s in splits for p in s.paths.tolist()]
    chunks = [full[k : k + _CHECK_CHUNK] for k in range(0, len(full), _CHECK_CHUNK)]
    with ThreadPoolExecutor(max_workers=min(_CHECK_WORKERS, max(1, len(chunks)))) as pool:
        found = [ok for chunk in pool.map(_exist, chunks) for ok in chunk]
    if all(found):
        return
    k = found.index(False)
    for split in splits:
        if k < len(split):
            rel = str(split.paths[k])
            raise DataError(
                f"{_where(split, k, ids.get(split.source))} lists the image {rel!r}, but "
                f"{os.path.join(lists.image_root, rel)} is not a file; put the images under "
                f"{lists.image_root} or fix the list ({split.source})"
            )
        k -= len(split)


def read_image_lists(
    name: str, root: str | os.PathLike[str], *, check_files: bool = True
) -> ImageLists:
    """Read and validate the split lists of ImageNet-LT, Places-LT or iNaturalist 2018.

    iNat18 has no validation split in its official protocol (train on ``train2018.json``, report
    on the 24,426 images of ``val2018.json``), so its ``val`` is empty and ``test`` is
    ``val2018.json``.

    Args:
        name: one of :data:`IMAGE_LIST_DATASETS`.
        root: the data root holding ``ImageNet_LT/``, ``Places_LT/`` or ``iNat18/``.
        check_files: check that every listed image exists (one ``stat`` each, in parallel).

    Raises:
        DataError: a missing folder, list or image; a malformed line or JSON entry; a label
            outside 0..num_classes-1. The message names the file and line (or entry).
    """
    if root is None or str(root) == "":
        raise DataError(f"no data root for '{name}': {_fix()}")
    folder = dataset_folder(name, root)
    if name == "inat18":
        lists, ids = _read_inat18(folder)
    else:
        lists, ids = _read_txt_dataset(name, folder), {}
    if check_files:
        _check_images(lists, ids)
    return lists
