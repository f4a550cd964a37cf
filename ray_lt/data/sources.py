"""Where the engine's batches come from: a tensor on the device, or JPEGs streamed by Ray Data.

The engine asks a source for a training epoch's batches in a sampled order and for a split's
evaluation batches in row order; it gets ``(rows, raw)`` pairs, ``rows`` the int64 row numbers on
the device, ``raw`` the uint8 images (or float rows) on the device. So the loop, the samplers and
the objectives are the same whichever source feeds them. A stream source built with a
``second_view`` yields ``(rows, raw, view2)`` training batches: the second view an objective asks
for (``Objective.second_view``), decoded from the full JPEG; on the device path the engine draws
it from the stored image instead.

- ``DeviceSource``: a small dataset lives on the device as one tensor (docs/data.md); a batch is
  one gather, with no host round trip.
- ``StreamSource``: a split too large for the device is a list of JPEG paths. Each epoch, the
  sampler's order (drawn exactly as for a device split, so class-balanced and square-root sampling
  hold unchanged) becomes a Ray Data dataset whose ``map_batches`` tasks decode and crop on CPU
  workers anywhere in the cluster (``ray_lt.data.decode``); batches reach the device through
  ``iter_torch_batches``, pinned on CUDA.

Why not ``ray.train.get_dataset_shard``: a Train dataset is fixed when ``fit()`` starts, but the
samplers redraw every epoch (class-aware and progressive sampling change with the epoch) and a
resumed stage must start at its checkpoint's epoch with that epoch's exact draws. Building the
epoch's dataset from the drawn order in each worker keeps both; each rank streams its own share.
Every row carries a seed derived from (stage seed, epoch, position), so a crop never depends on how
Ray Data batched the rows, and ``preserve_order`` keeps the sampled order: an epoch is the same
bytes on a rerun or a resume.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from ray_lt.data.decode import DEFAULT_SCALE
from ray_lt.data.spec import LTDataset, Split
from ray_lt.errors import ConfigError

#: Rows per decode task batch (one ``map_batches`` call).
DECODE_BATCH = 64
#: Rows per Ray Data block: small enough that an epoch spreads over many decode tasks.
BLOCK_ROWS = 512
#: Environment variable: CPUs each decode task reserves (default 1).
DECODE_CPUS_ENV = "RAY_LT_DECODE_CPUS"

Batches = Iterator[tuple[torch.Tensor, ...]]  # (rows, raw), or (rows, raw, view2): see above
Scale = tuple[float, float]  # a random resized crop's area range, as a fraction of the image's


class ImageSource(Protocol):
    """A split's images as the engine consumes them."""

    def __len__(self) -> int: ...

    def train_batches(self, order: torch.Tensor, batch_size: int, seed: int) -> Batches: ...

    def eval_batches(self, batch_size: int) -> Batches: ...


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A NumPy array as a tensor on ``device``, never writing the array.

    Arrays from the object store are read-only: on the CPU the tensor gets a copy (torch warns
    on, and must not share, read-only memory); on an accelerator the transfer is the copy.
    """
    if not array.flags.writeable and device.type == "cpu":
        array = array.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(device)


class DeviceSource:
    """A split held on the device as one tensor: batches are gathers."""

    def __init__(self, array: np.ndarray, device: torch.device):
        self.images = to_device(array, device)
        self.device = device

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def train_batches(self, order: torch.Tensor, batch_size: int, seed: int) -> Batches:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield rows, self.images[rows]

    def eval_batches(self, batch_size: int) -> Batches:
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield torch.arange(start, stop, device=self.device), self.images[start:stop]


def decode_cpus() -> float:
    """CPUs one decode task reserves: ``$RAY_LT_DECODE_CPUS`` or 1."""
    value = os.environ.get(DECODE_CPUS_ENV, "1")
    try:
        cpus = float(value)
    except ValueError:
        cpus = -1.0
    if not cpus > 0:
        raise ConfigError(f"{DECODE_CPUS_ENV}={value!r}: use a number of CPUs > 0, e.g. 1 or 0.5")
    return cpus


def row_seeds(seed: int, count: int) -> np.ndarray:
    """One int64 seed per position of an epoch's order, from the epoch's seed (below 2**62, so
    ``decode.VIEW_SEED_BIT`` can mark a second view's seeds)."""
    return (np.int64(seed) * np.int64(1_000_003) + np.arange(count, dtype=np.int64)) & (2**62 - 1)


def crop_scale(train_crop: Scale | bool | None) -> Scale | None:
    """The CPU training crop's area range: True is torchvision's default, False / None none."""
    if train_crop is True:
        return DEFAULT_SCALE
    if train_crop is False or train_crop is None:
        return None
    lo, hi = (float(v) for v in train_crop)
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"a crop's area range must hold 0 < low <= high <= 1, got {train_crop}")
    return lo, hi


class StreamSource:
    """A split of JPEG paths decoded by Ray Data tasks; nothing but the paths stays in memory.

    Args:
        split: a streamed split (``images`` holds relative paths).
        image_root: the folder the paths hang off, the same on every node.
        size: the square crop fed to the model.
        device: where the batches go.
        train_crop: the area range of the random resized crop + flip training batches get on
            the CPU (True: torchvision's 0.08-1, the ImageNet transform), or None / False for
            the evaluation crop (the device then augments it).
        second_view: the area range of a second, independent random resized crop + flip of
            each full image, yielded as ``view2``; None decodes none (and costs nothing).
    """

    def __init__(
        self,
        split: Split,
        image_root: str,
        size: int,
        device: torch.device,
        train_crop: Scale | bool | None = True,
        second_view: Scale | None = None,
    ):
        self.paths = split.images
        self.image_root = image_root
        self.size = size
        self.device = device
        self.train_crop = crop_scale(train_crop)
        self.second_view = crop_scale(second_view)

    def __len__(self) -> int:
        return len(self.paths)

    def train_batches(self, order: torch.Tensor, batch_size: int, seed: int) -> Batches:
        rows = order.cpu().numpy().astype(np.int64)
        seeds = row_seeds(seed, len(rows))
        yield from self._stream(rows, seeds, batch_size, self.train_crop, self.second_view)

    def eval_batches(self, batch_size: int) -> Batches:
        rows = np.arange(len(self), dtype=np.int64)
        yield from self._stream(rows, np.zeros(len(rows), np.int64), batch_size, None, None)

    def _stream(
        self,
        rows: np.ndarray,
        seeds: np.ndarray,
        batch_size: int,
        crop: Scale | None,
        second_view: Scale | None,
    ) -> Batches:
        if len(rows) == 0:
            return
        import ray.data

        from ray_lt.data.decode import decode_rows

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the sampled order, exactly
        # one dataset per epoch and split: progress bars would flood the trial's log
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        blocks = [
            pa.table(
                {
                    "row": rows[i : i + BLOCK_ROWS],
                    "path": self.paths[rows[i : i + BLOCK_ROWS]],
                    "seed": seeds[i : i + BLOCK_ROWS],
                }
            )
            for i in range(0, len(rows), BLOCK_ROWS)
        ]
        ds = ray.data.from_arrow(blocks).map_batches(
            decode_rows,
            fn_kwargs={
                "image_root": self.image_root,
                "size": self.size,
                "train": crop is not None,
                "scale": crop or DEFAULT_SCALE,
                "second_view": second_view,
            },
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            num_cpus=decode_cpus(),
        )
        cuda = self.device.type == "cuda"
        for batch in ds.iter_torch_batches(
            batch_size=batch_size,
            device=self.device,
            pin_memory=cuda,
            prefetch_batches=4 if cuda else 1,
        ):
            rows_t, image = batch["row"].to(self.device), batch["image"].to(self.device)
            if second_view is None:
                yield rows_t, image
            else:
                yield rows_t, image, batch["view2"].to(self.device)


def image_source(
    split: Split,
    data: LTDataset,
    device: torch.device,
    train_crop: Scale | bool | None = True,
    second_view: Scale | None = None,
) -> ImageSource:
    """The source for a split: streamed when it holds paths, else a device tensor.

    ``train_crop`` and ``second_view`` are the CPU crops of a streamed split (``StreamSource``);
    a device split ignores them (the engine draws its crops on the device).
    """
    if split.streamed:
        return StreamSource(
            split, data.image_root, data.image_size, device, train_crop, second_view
        )
    return DeviceSource(split.images, device)
