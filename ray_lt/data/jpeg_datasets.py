"""ImageNet-LT, Places-LT and iNaturalist 2018: split lists over JPEGs, on device or streamed.

``image_lists`` reads the lists; this module decides where the pixels live and registers the three
names in ``DATASETS``. The decision (``DataSpec.placement``):

- ``"device"``: every image is decoded once, resized and centre-cropped to ``image_size`` (the
  evaluation transform), and the splits are uint8 arrays like CIFAR's: the on-device path, with
  the crop / flip / jitter augmentations run on the device.
- ``"stream"``: the splits hold only the paths; ``ray_lt.data.sources.StreamSource`` decodes
  batches on CPU workers through Ray Data each epoch. The dataset is never loaded whole.
- ``"auto"`` (the default): ``"device"`` when the uint8 pixels of all splits at ``image_size``
  fit ``DEVICE_BYTES_LIMIT``, else ``"stream"``. ImageNet-LT at 224 px (186k images, 28 GB)
  streams; a CIFAR-sized tree stays on the device. The rule depends only on the spec and the
  lists, so a stage key (which holds ``placement``) always means the same data path.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ray_lt.data.decode import IMAGENET_MEAN, IMAGENET_STD, decode_batch
from ray_lt.data.image_lists import IMAGE_LIST_DATASETS, ImageListSplit, read_image_lists
from ray_lt.data.spec import DATASETS, DataSpec, LTDataset, Split
from ray_lt.errors import DataError

#: The most uint8 pixel bytes (all splits) that ``placement="auto"`` keeps on the device: 2 GiB,
#: CIFAR-100-LT at 32 px is 0.6 MB per thousand images; ImageNet-LT at 224 px is 28 GB.
DEVICE_BYTES_LIMIT = 2 * 2**30
#: Images decoded per thread task when a dataset is loaded onto the device.
_DECODE_CHUNK = 256


def pixel_bytes(num_images: int, image_size: int) -> int:
    """uint8 bytes of ``num_images`` RGB crops of ``image_size`` squared."""
    return num_images * 3 * image_size * image_size


def choose_placement(spec: DataSpec, num_images: int) -> str:
    """``"device"`` or ``"stream"`` for a dataset of ``num_images`` (all splits) under ``spec``.

    Args:
        spec: its ``placement`` forces the answer unless it is ``"auto"``.
        num_images: train + val + test images.
    """
    if spec.placement != "auto":
        return spec.placement
    fits = pixel_bytes(num_images, spec.image_size) <= DEVICE_BYTES_LIMIT
    return "device" if fits else "stream"


def _decode_all(split: ImageListSplit, image_root: str, size: int) -> np.ndarray:
    """Every image of a split as uint8 [N, 3, size, size] (evaluation crop), decoded by threads."""
    paths = [os.path.join(image_root, p) for p in split.paths]
    chunks = [paths[i : i + _DECODE_CHUNK] for i in range(0, len(paths), _DECODE_CHUNK)]
    if not chunks:
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda c: decode_batch(c, size=size, train=False), chunks))
    return np.ascontiguousarray(np.concatenate(parts))


def _split(split: ImageListSplit, images: np.ndarray) -> Split:
    return Split(
        images=images,
        labels=np.ascontiguousarray(split.labels, dtype=np.int64),
        source_index=np.arange(len(split), dtype=np.int64),
    )


def load_jpeg_lt(spec: DataSpec, root: str | None) -> LTDataset:
    """One of the JPEG datasets, its pixels on the device or streamed (see the module docstring).

    Args:
        spec: ``name`` (``imagenet_lt``, ``places_lt`` or ``inat18``), ``image_size`` and
            ``placement`` apply; the lists fix the classes and the long tail.
        root: the data root holding ``ImageNet_LT/``, ``Places_LT/`` or ``iNat18/``.
    """
    if root is None:
        raise DataError(
            f"dataset '{spec.name}' needs its files: set RAY_LT_DATA or pass --data-root to the "
            "folder that holds ImageNet_LT/, Places_LT/ or iNat18/ (see ray_lt.data.image_lists)"
        )
    lists = read_image_lists(spec.name, root)
    splits = {"train": lists.train, "val": lists.val, "test": lists.test}
    placement = choose_placement(spec, sum(len(s) for s in splits.values()))
    if placement == "stream":
        arrays = {name: np.asarray(s.paths, dtype=str) for name, s in splits.items()}
    else:
        arrays = {
            name: _decode_all(s, lists.image_root, spec.image_size) for name, s in splits.items()
        }
    return LTDataset(
        name=spec.name,
        num_classes=lists.num_classes,
        class_names=list(lists.class_names),
        train=_split(lists.train, arrays["train"]),
        val=_split(lists.val, arrays["val"]),
        test=_split(lists.test, arrays["test"]),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_root=lists.image_root,
        image_size=spec.image_size,
    )


for _name in IMAGE_LIST_DATASETS:
    DATASETS.register(_name)(load_jpeg_lt)
