"""One training epoch: the sampler's draw, augmented batches on the device, scheduled SGD steps.

Every draw is seeded by the stage seed and the epoch, so an epoch resumed from a checkpoint sees
the same indices and augmentations as an uninterrupted run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ray_lt.data import augment_batch, draw_epoch, normalize_batch
from ray_lt.data.augment import second_view_images
from ray_lt.data.spec import LTDataset
from ray_lt.engine.prepare import PreparedStage
from ray_lt.objective import Batch, uses_channels_last
from ray_lt.spec import TrainSpec

BATCH_STATS_ATTR = "update_batch_stats"


def lr_at(train: TrainSpec, epoch: float) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then the schedule."""
    if train.warmup_epochs and epoch < train.warmup_epochs:
        return train.lr * (epoch + 1e-8) / train.warmup_epochs
    if train.schedule == "cosine":
        span = max(train.epochs - train.warmup_epochs, 1)
        t = min(max(epoch - train.warmup_epochs, 0.0) / span, 1.0)
        return 0.5 * train.lr * (1.0 + math.cos(math.pi * t))
    if train.schedule == "step":
        return train.lr * train.gamma ** sum(epoch >= m for m in train.milestones)
    return train.lr


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except modules whose parameters are all frozen: they keep eval statistics.

    A module an objective marks with ``update_batch_stats = True`` stays in train mode with
    everything below it, frozen or not: MoCo's key encoder, or the original code's quirk of
    re-estimating a frozen encoder's BatchNorm statistics, as a named option.
    """
    model.train()
    keep: set[int] = set()
    for module in model.modules():
        if getattr(module, BATCH_STATS_ATTR, False):
            keep.update(id(m) for m in module.modules())
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params) and id(module) not in keep:
            module.eval()


def amp_enabled(train: TrainSpec, device: torch.device) -> bool:
    """bf16 autocast: on CUDA when the TrainSpec asks (CPU always runs fp32)."""
    return train.amp and device.type == "cuda"


def model_inputs(
    raw: torch.Tensor,
    data: LTDataset,
    train: TrainSpec,
    device: torch.device,
    gen: torch.Generator | None = None,
    augment: str | None = None,
) -> torch.Tensor:
    """The model's input batch: augmented (training) or normalised images, or float rows as is.

    ``augment`` overrides ``train.augment`` (a streamed split whose crop the CPU already took).
    """
    if raw.dtype != torch.uint8:  # precomputed features / logits: nothing to augment
        return raw
    if gen is None:
        x = normalize_batch(raw, data.mean, data.std)
    else:
        x = augment_batch(augment or train.augment, raw, gen, data.mean, data.std)
    if uses_channels_last(train, device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def order_seed(train: TrainSpec, epoch: int, rank: int) -> int:
    """Seed of a streamed epoch's CPU crops: fixed by the stage seed, the epoch and the rank."""
    return (train.seed * 100_003 + epoch) * 1_009 + rank


def device_view(
    stage: PreparedStage, raw: torch.Tensor, gen: torch.Generator
) -> torch.Tensor | None:
    """The objective's second view drawn on the device from the stored images (after x's draws,
    so independent of them); None when it asks for none. A streamed split's comes decoded."""
    scale = stage.objective.second_view
    return None if scale is None else second_view_images(raw, gen, scale)


def train_epoch(stage: PreparedStage, wrapped: nn.Module, epoch: int) -> tuple[dict, int]:
    """One epoch of steps on this rank's share of the sampler's draw.

    Returns each loss term's mean (``loss/<term>``) and their sum (``loss``), and the number of
    images this rank trained on.
    """
    train, device, data = stage.train, stage.device, stage.data
    set_train_mode(wrapped)
    gen = torch.Generator(device=device)
    gen.manual_seed(train.seed * 100_003 + epoch)  # same epoch, same draws: exact resume
    order = draw_epoch(
        train.sampler,
        stage.labels,
        data.num_classes,
        gen,
        epoch=epoch,
        total_epochs=train.epochs,
        **dict(train.sampler_params),
    )
    order = order[stage.rank :: stage.world]
    steps = math.ceil(len(order) / stage.per_rank_batch)
    sums: dict[str, torch.Tensor] = {}
    batches = stage.train_source.train_batches(
        order, stage.per_rank_batch, seed=int(order_seed(train, epoch, stage.rank))
    )
    for step, (idx, raw, *decoded) in enumerate(batches):
        x = model_inputs(raw, data, train, device, gen, stage.augment)
        view2 = decoded[0] if decoded else device_view(stage, raw, gen)
        batch = Batch(x=x, y=stage.labels[idx], index=idx, raw=raw, generator=gen, view2=view2)
        terms = sgd_step(stage, wrapped, batch, lr_at(train, epoch + step / steps))
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
    epoch_loss = {f"loss/{k}": float(v) / steps for k, v in sums.items()}
    epoch_loss["loss"] = sum(epoch_loss.values())
    return epoch_loss, len(order)


def sgd_step(
    stage: PreparedStage, wrapped: nn.Module, batch: Batch, lr: float
) -> dict[str, torch.Tensor]:
    """One optimiser step on the sum of the objective's loss terms; the terms."""
    for group in stage.optimizer.param_groups:
        group["lr"] = lr
    amp = amp_enabled(stage.train, stage.device)
    with torch.autocast(stage.device.type, torch.bfloat16, enabled=amp):
        terms = stage.objective.loss(wrapped, batch, stage.ctx)
    loss = sum(terms.values())
    stage.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    stage.optimizer.step()
    return terms
