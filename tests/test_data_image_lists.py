"""Tests for ray_lt.data.image_lists: ImageNet-LT, Places-LT and iNat18 lists on tiny trees.

Every tree is written by tests/image_trees.py into ``tmp_path`` (a few dozen small JPEGs), so
these tests need no real data and no Ray. Error tests corrupt one thing and check that the
``DataError`` names the file and the line (or JSON entry) at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_lt.data.image_lists import (
    IMAGE_LIST_DATASETS,
    ImageLists,
    dataset_folder,
    read_image_lists,
)
from ray_lt.errors import DataError
from ray_lt.metrics import FEW, MANY, MEDIUM, shot_groups
from tests.image_trees import FOLDERS, corrupt_line, list_file, make_tree, train_profile

TXT = ("imagenet_lt", "places_lt")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    edit(doc)
    path.write_text(json.dumps(doc), encoding="utf-8")


def test_dataset_names_and_folders(tmp_path: Path) -> None:
    assert IMAGE_LIST_DATASETS == ("imagenet_lt", "places_lt", "inat18")
    assert set(FOLDERS) == set(IMAGE_LIST_DATASETS)
    for name in IMAGE_LIST_DATASETS:
        assert dataset_folder(name, tmp_path) == tmp_path / FOLDERS[name]
    with pytest.raises(DataError, match="imagenet_lt, places_lt, inat18"):
        dataset_folder("cifar_lt", tmp_path)
    with pytest.raises(DataError, match="imagenet_lt, places_lt, inat18"):
        read_image_lists("ImageNet-LT", tmp_path)


@pytest.mark.parametrize("name", IMAGE_LIST_DATASETS)
def test_reads_each_format(tmp_path: Path, name: str) -> None:
    root = make_tree(tmp_path, name)
    lists = read_image_lists(name, str(root))
    assert isinstance(lists, ImageLists)
    assert lists.name == name
    assert lists.image_root == os.path.abspath(tmp_path / FOLDERS[name])
    assert lists.num_classes == 5
    counts = lists.train_counts
    assert counts.dtype == np.int64
    assert counts.tolist() == train_profile(5, 16, 8.0) == [16, 9, 5, 3, 2]
    assert len(lists.train) == sum(counts)
    assert len(lists.val) == (0 if name == "inat18" else 5 * 2)
    assert len(lists.test) == 5 * 4
    assert len(lists.class_names) == 5
    expected_names = [f"species_{c:03d}" if name == "inat18" else f"cls{c:03d}" for c in range(5)]
    assert lists.class_names == expected_names
    for split in (lists.train, lists.val, lists.test):
        assert split.paths.dtype.kind == "U"
        assert split.labels.dtype == np.int64
        assert split.lines.dtype == np.int64
        assert split.paths.shape == split.labels.shape == split.lines.shape == (len(split),)
        if len(split):
            assert os.path.isabs(split.source) and os.path.isfile(split.source)
            assert split.labels.min() >= 0 and split.labels.max() < lists.num_classes
        for rel in split.paths.tolist():
            assert not os.path.isabs(rel)
            assert os.path.isfile(os.path.join(lists.image_root, rel))
    # Rows come in file order: txt lines are 1-based, JSON entries 0-based.
    first = 0 if name == "inat18" else 1
    assert lists.train.lines.tolist() == list(range(first, first + len(lists.train)))
    if name == "inat18":
        assert lists.val.source == ""
        assert lists.test.source.endswith("val2018.json")
    else:
        assert lists.test.source.endswith(f"{FOLDERS[name]}_test.txt")


@pytest.mark.parametrize("name", IMAGE_LIST_DATASETS)
def test_shot_groups_straddle_thresholds(tmp_path: Path, name: str) -> None:
    root = make_tree(
        tmp_path, name, num_classes=6, max_per_class=120, imbalance=60.0, size=(16, 16)
    )
    lists = read_image_lists(name, root)
    assert lists.train_counts.tolist() == [120, 52, 23, 10, 4, 2]
    groups = shot_groups(lists.train_counts)
    assert groups.tolist() == [MANY, MEDIUM, MEDIUM, FEW, FEW, FEW]


def test_make_tree_is_deterministic_varied_and_learnable(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a", "places_lt", seed=3)
    b = make_tree(tmp_path / "b", "places_lt", seed=3)
    lists = read_image_lists("places_lt", a)
    rels = lists.train.paths.tolist() + lists.test.paths.tolist()
    for rel in rels:
        assert (a / "Places_LT" / rel).read_bytes() == (b / "Places_LT" / rel).read_bytes()
    sizes, means, labels = set(), [], []
    for rel, label in zip(rels, [*lists.train.labels, *lists.test.labels], strict=True):
        with Image.open(a / "Places_LT" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
            assert 36 <= w <= 60 and 30 <= h <= 50
            sizes.add((w, h))
            means.append(np.asarray(im, dtype=np.float64).mean(axis=(0, 1)))
            labels.append(int(label))
    assert len({w / h for w, h in sizes}) > 10  # aspect ratios vary
    # Mean colour alone separates the classes: nearest class centroid is (nearly) always right.
    means_arr, labels_arr = np.array(means), np.array(labels)
    centroids = np.stack([means_arr[labels_arr == c].mean(0) for c in range(5)])
    dist = ((means_arr[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == labels_arr).mean() >= 0.95


# ---------------------------------------------------------------------------------------------
# Missing images


@pytest.mark.parametrize("name", IMAGE_LIST_DATASETS)
def test_missing_image_names_list_and_line(tmp_path: Path, name: str) -> None:
    root = make_tree(tmp_path, name)
    lists = read_image_lists(name, root)
    row = 7  # a test image, so the train and val checks pass first
    rel = str(lists.test.paths[row])
    os.remove(os.path.join(lists.image_root, rel))
    with pytest.raises(DataError) as info:
        read_image_lists(name, root)
    msg = str(info.value)
    assert "\n" not in msg
    assert rel in msg
    if name == "inat18":
        assert "val2018.json annotations[7]" in msg and "image_id" in msg
    else:
        assert f"{FOLDERS[name]}_test.txt line 8" in msg
    # check_files=False skips the check: the deleted image is then not an error.
    again = read_image_lists(name, root, check_files=False)
    assert len(again.test) == len(lists.test)


def test_first_missing_image_is_reported(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "imagenet_lt")
    folder = root / "ImageNet_LT"
    for line_no in (5, 12):
        rel = _lines(folder / "ImageNet_LT_train.txt")[line_no - 1].rsplit(None, 1)[0]
        os.remove(folder / rel)
    with pytest.raises(DataError, match=r"ImageNet_LT_train\.txt line 5\b"):
        read_image_lists("imagenet_lt", root)


# ---------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("name", IMAGE_LIST_DATASETS)
def test_test_label_out_of_range(tmp_path: Path, name: str) -> None:
    root = make_tree(tmp_path, name)
    path = list_file(root, name, "test")
    if name == "inat18":

        def edit(doc: dict) -> None:
            doc["annotations"][2]["category_id"] = 5

        _edit_json(path, edit)
        where = "val2018.json annotations[2] (image_id "
    else:
        rel = _lines(path)[2].rsplit(None, 1)[0]
        corrupt_line(path, 3, f"{rel} 5")
        where = f"{FOLDERS[name]}_test.txt line 3"
    with pytest.raises(DataError) as info:
        read_image_lists(name, root)
    msg = str(info.value)
    assert where in msg and " 5 " in msg and "0..4" in msg


@pytest.mark.parametrize("name", TXT)
def test_negative_label(tmp_path: Path, name: str) -> None:
    root = make_tree(tmp_path, name)
    path = list_file(root, name, "train")
    rel = _lines(path)[3].rsplit(None, 1)[0]
    corrupt_line(path, 4, f"{rel} -1")
    with pytest.raises(DataError, match=rf"{FOLDERS[name]}_train\.txt line 4: label -1"):
        read_image_lists(name, root)


def test_inat18_negative_train_category(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "inat18")

    def edit(doc: dict) -> None:
        doc["annotations"][4]["category_id"] = -3

    _edit_json(list_file(root, "inat18", "train"), edit)
    with pytest.raises(DataError, match=r"train2018\.json annotations\[4\].*-3"):
        read_image_lists("inat18", root)


# ---------------------------------------------------------------------------------------------
# Malformed text lists


@pytest.mark.parametrize("name", TXT)
@pytest.mark.parametrize(
    "bad",
    ["train/only_one_field.JPEG", "train/x.JPEG 3.5", "train/x.JPEG cat", "7"],
    ids=["one-field", "float-label", "word-label", "label-only"],
)
def test_malformed_line(tmp_path: Path, name: str, bad: str) -> None:
    root = make_tree(tmp_path, name)
    corrupt_line(list_file(root, name, "val"), 4, bad)
    with pytest.raises(DataError) as info:
        read_image_lists(name, root, check_files=False)
    msg = str(info.value)
    assert f"{FOLDERS[name]}_val.txt line 4 is malformed" in msg
    assert repr(bad) in msg and "expected 'relative/path.jpg <integer label>'" in msg


def test_malformed_line_is_shown_truncated(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "places_lt")
    corrupt_line(list_file(root, "places_lt", "train"), 2, "x" * 500)
    with pytest.raises(DataError) as info:
        read_image_lists("places_lt", root)
    assert "line 2" in str(info.value) and len(str(info.value)) < 300


def test_blank_lines_trailing_space_and_spaces_in_paths(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "imagenet_lt")
    folder = root / "ImageNet_LT"
    spaced = "train/cls004/with  two spaces.JPEG"
    (folder / "train/cls000/img0000.JPEG").rename(folder / spaced)
    path = folder / "ImageNet_LT_train.txt"
    rows = _lines(path)
    rows[0] = f"{spaced}\t4   "
    path.write_text("\n\n" + "\r\n".join(rows) + "\n  \n\n", encoding="utf-8")
    lists = read_image_lists("imagenet_lt", root)
    assert lists.train.paths[0] == spaced and lists.train.labels[0] == 4
    assert lists.train.lines.tolist() == list(range(3, 3 + len(rows)))
    assert lists.train_counts.tolist() == [15, 9, 5, 3, 3]
    # Line numbers count the blank lines: the 3rd row of data is line 5.
    corrupt_line(path, 5, "broken")
    with pytest.raises(DataError, match=r"ImageNet_LT_train\.txt line 5 is malformed"):
        read_image_lists("imagenet_lt", root)


def test_txt_class_names_fall_back_to_labels(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "places_lt", num_classes=3)
    folder = root / "Places_LT"
    (folder / "flat.jpg").write_bytes((folder / "data_large/cls002/train0000.jpg").read_bytes())
    path = folder / "Places_LT_train.txt"
    text = path.read_text(encoding="utf-8").replace("data_large/cls002/train0000.jpg", "flat.jpg")
    path.write_text(text, encoding="utf-8")
    lists = read_image_lists("places_lt", root)
    assert lists.class_names == ["cls000", "cls001", "2"]


# ---------------------------------------------------------------------------------------------
# Missing lists and folders


@pytest.mark.parametrize("name", IMAGE_LIST_DATASETS)
def test_missing_list_file(tmp_path: Path, name: str) -> None:
    root = make_tree(tmp_path, name)
    path = list_file(root, name, "test")
    path.unlink()
    with pytest.raises(DataError) as info:
        read_image_lists(name, root)
    msg = str(info.value)
    assert str(path) in msg and "RAY_LT_DATA" in msg and "--data-root" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", IMAGE_LIST_DATASETS)
def test_missing_dataset_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as info:
        read_image_lists(name, tmp_path)
    msg = str(info.value)
    assert str(tmp_path / FOLDERS[name]) in msg and "RAY_LT_DATA" in msg


# ---------------------------------------------------------------------------------------------
# iNat18 JSON


def test_inat18_unknown_image_id(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "inat18")

    def edit(doc: dict) -> None:
        doc["annotations"][6]["image_id"] = 99999

    _edit_json(list_file(root, "inat18", "train"), edit)
    with pytest.raises(DataError, match=r"train2018\.json annotations\[6\] names image_id 99999"):
        read_image_lists("inat18", root)


def test_inat18_malformed_json(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "inat18")
    path = list_file(root, "inat18", "test")
    path.write_text(path.read_text(encoding="utf-8")[:-40], encoding="utf-8")
    with pytest.raises(DataError, match=r"val2018\.json is not valid JSON \(line 1 column") as e:
        read_image_lists("inat18", root)
    assert isinstance(e.value.__cause__, json.JSONDecodeError)


def test_inat18_image_without_annotation(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "inat18")

    def edit(doc: dict) -> None:
        del doc["annotations"][3]

    _edit_json(list_file(root, "inat18", "train"), edit)
    with pytest.raises(DataError, match=r"train2018\.json images\[3\] \(id 3, .*no annotation"):
        read_image_lists("inat18", root)


@pytest.mark.parametrize(
    ("where", "key", "expected"),
    [
        ("images", "file_name", r"images\[2\] \(id 2\) lacks the key 'file_name'"),
        ("images", "id", r"images\[2\] lacks the key 'id'"),
        ("annotations", "category_id", r"annotations\[2\] \(image_id 2\) lacks the key"),
        ("annotations", "image_id", r"annotations\[2\] lacks the key 'image_id'"),
    ],
)
def test_inat18_missing_key(tmp_path: Path, where: str, key: str, expected: str) -> None:
    root = make_tree(tmp_path, "inat18")

    def edit(doc: dict) -> None:
        del doc[where][2][key]

    _edit_json(list_file(root, "inat18", "train"), edit)
    with pytest.raises(DataError, match=rf"train2018\.json {expected}"):
        read_image_lists("inat18", root)


def test_inat18_missing_top_level_list_and_non_int_category(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "inat18")
    path = list_file(root, "inat18", "test")
    _edit_json(path, lambda doc: doc.pop("annotations"))
    with pytest.raises(DataError, match=r"val2018\.json has no 'annotations' list"):
        read_image_lists("inat18", root)
    make_tree(tmp_path, "inat18")

    def edit(doc: dict) -> None:
        doc["annotations"][1]["category_id"] = "3"

    _edit_json(path, edit)
    with pytest.raises(DataError, match=r"val2018\.json annotations\[1\] .*expected an integer"):
        read_image_lists("inat18", root)


def test_inat18_order_first_annotation_and_missing_categories(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "inat18")
    path = list_file(root, "inat18", "train")
    before = read_image_lists("inat18", root)

    def edit(doc: dict) -> None:
        del doc["categories"]
        doc["annotations"].reverse()  # image order must still follow "images"
        first = dict(doc["annotations"][-1])  # image 0's annotation, now last
        doc["annotations"].append({**first, "category_id": 4})  # a later one is ignored

    _edit_json(path, edit)
    lists = read_image_lists("inat18", root)
    n = len(before.train)
    assert lists.train.paths.tolist() == before.train.paths.tolist()
    assert lists.train.labels.tolist() == before.train.labels.tolist()
    assert lists.train.lines.tolist() == list(range(n - 1, -1, -1))
    # Without "categories" in train2018.json, names come from val2018.json's categories ...
    assert lists.class_names == before.class_names
    # ... and without them anywhere, they are the ids.
    _edit_json(list_file(root, "inat18", "test"), lambda doc: doc.pop("categories"))
    assert read_image_lists("inat18", root).class_names == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------------------------------------
# Damaged files: one DataError line naming the file, never a library traceback


def _one_line_naming(info: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg, msg
    return msg


@pytest.mark.parametrize("name", TXT)
@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank"])
def test_empty_txt_list(tmp_path: Path, name: str, split: str, content: bytes) -> None:
    root = make_tree(tmp_path, name)
    path = list_file(root, name, split)
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_image_lists(name, root, check_files=False)
    msg = _one_line_naming(info, path)
    assert str(path) in msg and "lists no images" in msg and "restore" in msg


@pytest.mark.parametrize("name", TXT)
@pytest.mark.parametrize(
    ("garbage", "damage"),
    [
        (bytes(range(256)) * 4, "is not UTF-8 text (byte 128"),
        (b"\x00\x01\x02\x03binary\x00" * 40, "holds binary data (NUL bytes)"),
        (b"train/a.JPEG 1\n\xff\xfe\xfd garbage 3\n", "is not UTF-8 text (byte 15"),
    ],
    ids=["all-bytes", "nul-bytes", "one-bad-line"],
)
def test_garbage_txt_list(tmp_path: Path, name: str, garbage: bytes, damage: str) -> None:
    root = make_tree(tmp_path, name)
    path = list_file(root, name, "test")
    path.write_bytes(garbage)
    with pytest.raises(DataError) as info:
        read_image_lists(name, root, check_files=False)
    msg = _one_line_naming(info, path)
    assert f"list {path} {damage}" in msg and "restore the file" in msg


@pytest.mark.parametrize(
    "bad",
    ["train/x.JPEG 1e3", "train/x.JPEG 0x1f", "train/x.JPEG 12345678901234", "a b c 3.0", "x -"],
    ids=["exponent", "hex", "huge", "float", "sign-only"],
)
def test_non_integer_or_malformed_label_is_one_line(tmp_path: Path, bad: str) -> None:
    root = make_tree(tmp_path, "imagenet_lt")
    path = list_file(root, "imagenet_lt", "train")
    corrupt_line(path, 2, bad)
    with pytest.raises(DataError) as info:
        read_image_lists("imagenet_lt", root)
    msg = _one_line_naming(info, path)
    assert "ImageNet_LT_train.txt line 2 is malformed" in msg and "; fix it (" in msg


@pytest.mark.parametrize(
    ("content", "damage"),
    [
        (None, "is not valid JSON (line 1 column"),
        ("", "is empty (line 1 column 1"),
        ("[" * 100_000, "nests too deeply"),
        ("[1, 2, 3]", "holds a JSON list, expected an object"),
        ('"images"', "holds a JSON str, expected an object"),
        ('{"images": {}, "annotations": []}', "'images' is a dict, not a list"),
        ('{"annotations": []}', "has no 'images' list"),
        ('{"images": [7], "annotations": []}', "images[0] is a int, not an object"),
        ('{"images": [{"id": "0", "file_name": "a.jpg"}], "annotations": []}', "expected an int"),
        ('{"images": [{"id": 0, "file_name": 5}], "annotations": []}', "expected a string"),
        ('{"images": [{"id": true, "file_name": "a"}], "annotations": []}', "expected an int"),
        ('{"images": [], "annotations": []}', "lists no images ('images' is empty)"),
    ],
    ids=[
        "truncated",
        "empty",
        "deep",
        "list",
        "string",
        "images-dict",
        "no-images",
        "image-int",
        "id-str",
        "name-int",
        "id-bool",
        "no-entries",
    ],
)
@pytest.mark.parametrize("split", ["train", "test"])
def test_damaged_coco_json(tmp_path: Path, split: str, content: str | None, damage: str) -> None:
    root = make_tree(tmp_path, "inat18")
    path = list_file(root, "inat18", split)
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) // 2] if content is None else content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_image_lists("inat18", root, check_files=False)
    msg = _one_line_naming(info, path)
    assert damage in msg and str(path) in msg and "iNaturalist" in msg


def test_coco_json_that_is_not_utf8(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "inat18")
    path = list_file(root, "inat18", "train")
    path.write_bytes(b'{"images": ["\xff\xfe"]}')
    with pytest.raises(DataError) as info:
        read_image_lists("inat18", root)
    msg = _one_line_naming(info, path)
    assert "train2018.json is not UTF-8 JSON (byte 13" in msg and str(path) in msg
