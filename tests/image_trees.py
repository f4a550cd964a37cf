"""Tiny long-tailed datasets on disk in the ImageNet-LT, Places-LT and iNat18 formats.

Tests and benchmarks need the real file layouts (list files, COCO-style JSON, JPEG folders)
without the real 20k-440k images. ``make_tree`` writes a few dozen small JPEGs per dataset with
the long-tail profile the tests assert on. The images are learnable on purpose (a hue per class
plus stripes of a class-dependent frequency, under mild noise) so that a short training run on
them can show that the pipeline learns, and their sizes vary so that resizing code is exercised.
Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image

FOLDERS = {"imagenet_lt": "ImageNet_LT", "places_lt": "Places_LT", "inat18": "iNat18"}


def train_profile(num_classes: int, max_per_class: int, imbalance: float) -> list[int]:
    """Train images per class: exponential, class 0 the largest, at least 1."""
    if num_classes == 1:
        return [max(1, int(max_per_class))]
    return [
        max(1, int(max_per_class * imbalance ** (-c / (num_classes - 1))))
        for c in range(num_classes)
    ]


def _image(
    c: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """One learnable image of class ``c``: hue background, stripes, noise, jittered size."""
    w = max(8, int(round(size[0] * rng.uniform(0.75, 1.25))))
    h = max(8, int(round(size[1] * rng.uniform(0.75, 1.25))))
    rgb = np.array(colorsys.hsv_to_rgb(c / num_classes, 0.85, 0.95)) * 255.0
    # Stripes: 2..6 periods across the image, vertical or horizontal by class.
    periods = 2 + c % 5
    if (c // 5) % 2 == 0:
        coord = np.broadcast_to(np.arange(w)[None, :] / w, (h, w))
    else:
        coord = np.broadcast_to(np.arange(h)[:, None] / h, (h, w))
    stripe = (np.floor(coord * 2 * periods) % 2)[..., None]
    pixels = rgb[None, None, :] * (0.6 + 0.4 * stripe)
    pixels = pixels + rng.normal(0.0, 8.0, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(path: Path, image: Image.Image) -> tuple[int, int]:
    """Save ``image`` as a JPEG at ``path``; return its (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)
    return image.size


def make_tree(
    root: Path,
    name: str,
    *,
    num_classes: int = 5,
    max_per_class: int = 16,
    imbalance: float = 8.0,
    val_per_class: int = 2,
    test_per_class: int = 4,
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
) -> Path:
    """Write a tiny long-tailed dataset in `name`'s format under root; return root.

    ``root`` is the folder to use as ``RAY_LT_DATA``; the dataset goes to ``root/FOLDERS[name]``.
    Train images per class follow :func:`train_profile`; val and test have ``val_per_class`` and
    ``test_per_class`` images per class (inat18 has no val: its ``val2018.json`` is the test set
    with ``test_per_class`` per class). Lists are written class by class, in image order.
    """
    if name not in FOLDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(FOLDERS)}")
    root = Path(root)
    folder = root / FOLDERS[name]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = train_profile(num_classes, max_per_class, imbalance)
    sizes: dict[str, tuple[int, int]] = {}

    def draw(split: str, per_class: list[int], sub: str, ext: str) -> list[tuple[str, int]]:
        rows = []  # (relative path, class)
        for c, n in enumerate(per_class):
            for i in range(n):
                rel = f"{sub}/cls{c:03d}/{split}{i:04d}.{ext}"
                if name == "inat18":
                    rel = f"{sub}/Cat/{c}/{split}{i:04d}.{ext}"
                sizes[rel] = _write(folder / rel, _image(c, num_classes, size, rng))
                rows.append((rel, c))
        return rows

    if name == "inat18":
        train = draw("train", counts, "train_val2018", "jpg")
        test = draw("val", [test_per_class] * num_classes, "train_val2018", "jpg")
        categories = [
            {"id": c, "name": f"species_{c:03d}", "supercategory": "Cat"}
            for c in range(num_classes)
        ]
        next_id = 0
        for fname, rows in (("train2018.json", train), ("val2018.json", test)):
            images, annotations = [], []
            for rel, c in rows:
                width, height = sizes[rel]
                images.append({"id": next_id, "file_name": rel, "width": width, "height": height})
                annotations.append({"id": next_id, "image_id": next_id, "category_id": c})
                next_id += 1
            doc = {"images": images, "annotations": annotations, "categories": categories}
            (folder / fname).write_text(json.dumps(doc), encoding="utf-8")
        return root

    prefix = FOLDERS[name]
    if name == "imagenet_lt":
        train = draw("img", counts, "train", "JPEG")
        val = draw("val", [val_per_class] * num_classes, "val", "JPEG")
        test = draw("test", [test_per_class] * num_classes, "val", "JPEG")
    else:
        train = draw("train", counts, "data_large", "jpg")
        val = draw("val", [val_per_class] * num_classes, "data_large", "jpg")
        test = draw("test", [test_per_class] * num_classes, "data_large", "jpg")
    for split, rows in (("train", train), ("val", val), ("test", test)):
        text = "".join(f"{rel} {c}\n" for rel, c in rows)
        (folder / f"{prefix}_{split}.txt").write_text(text, encoding="utf-8")
    return root


def list_file(root: Path, name: str, split: str) -> Path:
    """The list file of ``split`` ("train", "val", "test"; inat18: "train", "test")."""
    folder = Path(root) / FOLDERS[name]
    if name == "inat18":
        return folder / {"train": "train2018.json", "test": "val2018.json"}[split]
    return folder / f"{FOLDERS[name]}_{split}.txt"


def corrupt_line(list_file: Path, line_no: int, new_text: str) -> None:
    """Replace the 1-based line ``line_no`` of a text list with ``new_text``."""
    path = Path(list_file)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not 1 <= line_no <= len(lines):
        raise IndexError(f"{path} has {len(lines)} lines, no line {line_no}")
    lines[line_no - 1] = new_text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
