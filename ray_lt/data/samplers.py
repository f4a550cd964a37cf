"""Epoch samplers: which training images one epoch visits, drawn on the device as one tensor.

Long-tailed methods differ mostly in how they sample (instance, class-balanced, square-root,
progressive, class-aware), so samplers are registered by name and a stage names its sampler. Each
draws a whole epoch of indices with tensor ops from an explicit ``torch.Generator`` — no
per-sample Python loops, no global random state — so an epoch is reproducible from its seed and
costs microseconds on the accelerator. A sampler must not look at images, only labels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ray_lt.errors import ConfigError, DataError
from ray_lt.registry import Registry

Sampler = Callable[..., torch.Tensor]
SAMPLERS = Registry[Sampler]("sampler")
_FIXED = ("epoch", "total_epochs")


def _class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes)


def _draw_by_class(
    labels: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """len(labels) indices: a class drawn with ``probs``, then a uniform image of that class."""
    n = labels.numel()
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    probs = torch.where(counts > 0, probs.to(torch.float64), 0.0)
    cls = torch.multinomial(probs, n, replacement=True, generator=generator)
    u = torch.rand(n, generator=generator, device=labels.device, dtype=torch.float64)
    size = counts[cls]
    offset = torch.minimum((u * size).long(), size - 1)
    return order[starts[cls] + offset]


@SAMPLERS.register("instance")
def instance(
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    epoch: int,
    total_epochs: int,
) -> torch.Tensor:
    """Every image once, in random order (a permutation)."""
    return torch.randperm(labels.numel(), generator=generator, device=labels.device)


@SAMPLERS.register("class_balanced")
def class_balanced(
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    epoch: int,
    total_epochs: int,
) -> torch.Tensor:
    """A class uniformly at random (among classes with images), then a random image of it."""
    counts = _class_counts(labels, num_classes)
    return _draw_by_class(labels, counts, (counts > 0).double(), generator)


@SAMPLERS.register("square_root")
def square_root(
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    epoch: int,
    total_epochs: int,
) -> torch.Tensor:
    """A class with probability proportional to sqrt(n_c), then a random image of it."""
    counts = _class_counts(labels, num_classes)
    return _draw_by_class(labels, counts, counts.double().sqrt(), generator)


@SAMPLERS.register("progressive")
def progressive(
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    epoch: int,
    total_epochs: int,
) -> torch.Tensor:
    """Kang et al. 2020: class probability (1 - t) * n_c / N + t / C with t = epoch / total."""
    counts = _class_counts(labels, num_classes).double()
    t = min(max(epoch / total_epochs, 0.0), 1.0)
    nonempty = (counts > 0).double()
    probs = (1.0 - t) * counts / counts.sum() + t * nonempty / nonempty.sum()
    return _draw_by_class(labels, counts.long(), probs, generator)


@SAMPLERS.register("class_aware")
def class_aware(
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    epoch: int,
    total_epochs: int,
    k: int = 1,
) -> torch.Tensor:
    """classifier-balancing's ClassAwareSampler (``num_samples_cls=k``), vectorised.

    Classes are visited in rounds, each round a fresh random order of the classes that have
    images; a visit yields k images of its class. Within a class, images are taken without
    replacement from a shuffled order, reshuffled each time the class is used up.

    Args:
        k: images per class visit (SSD-LT stage II uses 2).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"class_aware sampler: k must be an integer >= 1, got {k!r}")
    dev, n = labels.device, labels.numel()
    counts = _class_counts(labels, num_classes)
    nonempty = torch.nonzero(counts > 0).flatten()
    visits = -(-n // k)
    rounds = -(-visits // nonempty.numel())
    keys = torch.rand(rounds, nonempty.numel(), generator=generator, device=dev)
    visit_cls = nonempty[torch.argsort(keys, dim=1).flatten()[:visits]]
    cls = visit_cls.repeat_interleave(k)[:n]

    # rank[i]: how many earlier samples of the epoch share sample i's class
    by_cls = torch.argsort(cls, stable=True)
    draws = torch.bincount(cls, minlength=num_classes)
    draw_starts = torch.cumsum(draws, 0) - draws
    rank = torch.empty_like(cls)
    rank[by_cls] = torch.arange(n, device=dev) - draw_starts[cls[by_cls]]

    # One shuffled pass over a class's images per segment; a class gets ceil(draws / n_c) passes
    # laid end to end, so its j-th draw is element j of its stretch.
    passes = torch.where(counts > 0, -(-draws // counts.clamp_min(1)), 0)
    stretch = passes * counts
    stretch_starts = torch.cumsum(stretch, 0) - stretch
    pass_starts = torch.cumsum(passes, 0) - passes
    elem_cls = torch.repeat_interleave(torch.arange(num_classes, device=dev), stretch)
    pos = torch.arange(elem_cls.numel(), device=dev) - stretch_starts[elem_cls]
    item = pos % counts[elem_cls]
    segment = pos // counts[elem_cls] + pass_starts[elem_cls]
    shuffle = torch.randperm(elem_cls.numel(), generator=generator, device=dev)
    shuffle = shuffle[torch.argsort(segment[shuffle], stable=True)]
    shuffled_item = item[shuffle]

    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    return order[starts[cls] + shuffled_item[stretch_starts[cls] + rank]]


def sampler_params(name: str) -> list[str]:
    """The extra keyword parameters the sampler ``name`` accepts (e.g. ``["k"]``)."""
    sig = inspect.signature(SAMPLERS.get(name))
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _FIXED
    ]


def draw_epoch(
    name: str,
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    epoch: int = 0,
    total_epochs: int = 1,
    **params: object,
) -> torch.Tensor:
    """One epoch of int64 indices into ``labels`` (length len(labels)) from the sampler ``name``.

    Random numbers are drawn on the generator's device; the result is on ``labels.device``.

    Args:
        name: a ``SAMPLERS`` key: instance, class_balanced, square_root, progressive, class_aware.
        labels: int64 class of every training image, shape [N].
        num_classes: C; labels must lie in [0, C).
        generator: the only source of randomness (seed it per epoch for reproducible epochs).
        epoch: this epoch (0-based), used by schedule-dependent samplers (progressive).
        total_epochs: epochs in the stage, >= 1.
        params: sampler parameters, e.g. ``k=2`` for class_aware; unknown ones are an error.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> draw_epoch("class_aware", torch.tensor([0, 0, 0, 1]), 2, g, k=2).shape
        torch.Size([4])
    """
    fn = SAMPLERS.get(name)
    valid = sampler_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for sampler '{name}'; "
            f"valid: {', '.join(valid) or '(none)'}"
        )
    if total_epochs < 1 or epoch < 0:
        raise ConfigError(
            f"sampler '{name}': need epoch >= 0 and total_epochs >= 1, got {epoch}/{total_epochs}"
        )
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"sampler labels must be a 1-D integer tensor, got {labels.dtype}")
    out_device = labels.device
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=out_device)
    lab = labels.to(device=generator.device, dtype=torch.int64)
    low, high = int(lab.min()), int(lab.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"sampler labels span {low}..{high}, outside 0..{num_classes - 1}; "
            "check num_classes against the dataset"
        )
    idx = fn(lab, num_classes, generator, epoch=epoch, total_epochs=total_epochs, **params)
    return idx.to(device=out_device, dtype=torch.int64)
