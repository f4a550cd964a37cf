"""Class-balanced experts (Sharma et al., GCPR 2020): ``cbe_expert`` here, ``cbe_logits``
(stages/cbe_logits.py) and ``cbe_calibrate`` (stages/cbe_calibration.py).

Pipeline: a generalist (any stage whose model keeps its backbone under ``backbone.``, normally
``ce``) -> one ``cbe_expert`` per class split -> ``cbe_logits`` (every expert's raw logits on the
val and test splits, one Parquet column per expert) -> ``cbe_calibrate`` (joint calibration,
trained on the val logits, selected on val, reported on test).

Decisions the paper leaves open, for the experts:

- Split rule: a class belongs to an expert iff ``low <= train count < high`` (``high=None`` is
  infinity), so a class with exactly 100 images is a many-shot expert's class. This is CBE's
  rule, kept apart from the report's many/medium/few groups (``ray_lt.metrics``: many > 100
  unless the data spec sets ``many_inclusive=True``, as CBE's ImageNet-LT / Places-LT files do).
- The expert's data view (``prepare_data``): in-split labels re-indexed 0..S-1 in increasing
  global-class order, one "open" label S. Train: every in-split image plus
  ``floor(N_split / open_ratio)`` out-of-split images drawn once, uniformly, without
  replacement, with ``numpy.random.default_rng([open_seed, 0])``. Val and test: every in-split
  image plus as many out-of-split images (fewer if there are fewer), drawn with streams 1 and 2,
  so the expert's own accuracy (open predictions count) selects its epoch.
- ``num_learnable``: -1 trains everything. On a backbone with CBE's 512-d FC after pooling
  (``fc512``, torchvision backbones), the original's meaning: 1 the classifier, 2 classifier +
  FC, k >= 3 also the last k - 2 residual stages. Without that FC (CIFAR ResNets, or
  ``fc512=False``) there is nothing for "2" to add, so k >= 1 trains the classifier and the last
  k - 1 stages (CIFAR ResNet-32: layer3, layer2, layer1; torchvision: layer4 .. layer1): the
  original's k >= 3 is k - 1 there. The stem trains only with -1. Frozen parts keep their
  BatchNorm statistics (eval mode) unless ``update_frozen_bn=True`` reproduces the original
  code, where frozen BatchNorms still re-estimate statistics on the expert's data.
- ``open_class=False`` (an ablation): no open output and no open images in any split; the
  expert has S outputs and sees only its own classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from ray_lt.data.spec import LTDataset, Split
from ray_lt.errors import ConfigError
from ray_lt.models import LTModel, freeze, linear_head
from ray_lt.objective import OBJECTIVES, Batch, Objective, StageContext, make_objective
from ray_lt.stages.cbe_calibration import (  # noqa: F401  (callers import them from here)
    CalibrationModel,
    Layout,
)
from ray_lt.stages.upstream import ce_terms, load_weights, need_input, rebuild_input, skeleton

STAGE_NAMES = ("layer4", "layer3", "layer2", "layer1")  # top-down; CIFAR ResNets stop at 3
HINT = "build it with ray_lt.recipes.cbe.cbe(...)"


def in_split(counts: np.ndarray, low: int, high: int | None) -> np.ndarray:
    """Boolean class mask of an expert: ``low <= count < high`` (``high=None``: no bound)."""
    counts = np.asarray(counts)
    return (counts >= low) & (counts < (math.inf if high is None else high))


def span(low: int, high: int | None) -> str:
    return f"[{low}, {'inf' if high is None else high})"


def check_split(counts: np.ndarray, low: int, high: int | None, dataset: str) -> np.ndarray:
    """The expert's class mask; an error when no class's train count is in its span."""
    mask = in_split(counts, low, high)
    if not mask.any():
        raise ConfigError(
            f"cbe_expert with low={low}, high={high} has no classes: no class of '{dataset}' "
            f"has a train count in {span(low, high)} (counts {int(np.min(counts))}.."
            f"{int(np.max(counts))}); move the thresholds"
        )
    return mask


def _draw(candidates: np.ndarray, n: int, seed: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([seed, stream])
    n = min(n, len(candidates))
    return np.sort(rng.choice(candidates, size=n, replace=False)) if n else candidates[:0]


def expert_view(
    data: LTDataset,
    low: int,
    high: int | None,
    open_ratio: float,
    seed: int,
    open_class: bool = True,
) -> LTDataset:
    """The expert's dataset: its classes re-indexed 0..S-1 plus an open class S (module doc).

    Args:
        data: the full dataset (its train counts decide the split).
        low, high: the split rule ``low <= count < high``.
        open_ratio: in-split training images per open image (> 0).
        seed: the draws' seed (train stream 0, val 1, test 2).
        open_class: False drops the open class: S labels, in-split images only.
    """
    mask = check_split(data.class_counts, low, high, data.name)
    classes = np.flatnonzero(mask)
    s = len(classes)
    remap = np.full(data.num_classes, s, dtype=np.int64)
    remap[classes] = np.arange(s)
    splits = {}
    sources = {"train": data.train, "val": data.val, "test": data.test}
    for stream, (name, split) in enumerate(sources.items()):
        inside = mask[split.labels]
        own = np.flatnonzero(inside)
        n_open = math.floor(len(own) / open_ratio) if name == "train" else len(own)
        n_open = n_open if open_class else 0
        rows = np.concatenate([own, _draw(np.flatnonzero(~inside), n_open, seed, stream)])
        splits[name] = Split(
            images=np.ascontiguousarray(split.images[rows]),
            labels=remap[split.labels[rows]].astype(np.int64),
            source_index=split.source_index[rows].astype(np.int64),
        )
    names = [data.class_names[c] for c in classes] + (["open"] if open_class else [])
    name = f"{data.name}:expert{span(low, high)}"
    return LTDataset(
        name,
        len(names),
        names,
        **splits,
        mean=data.mean,
        std=data.std,
        many_inclusive=data.many_inclusive,
    )


def _stages(backbone: nn.Module) -> list[nn.Module]:
    children = dict(backbone.named_children())
    return [children[n] for n in STAGE_NAMES if n in children]


def feature_fc(backbone: nn.Module) -> nn.Module | None:
    """CBE's FC after pooling (``fc512``) when the backbone has one, else None."""
    fc = dict(backbone.named_children()).get("fc")
    return fc if fc is not None and any(True for _ in fc.parameters()) else None


def learnable_parts(backbone: nn.Module) -> list[nn.Module]:
    """What k = 2, 3, ... add to the classifier, in order: the FC (if any), then the stages
    top-down, so ``num_learnable`` k trains the classifier and the first k - 1 of them."""
    fc = feature_fc(backbone)
    return ([fc] if fc is not None else []) + _stages(backbone)


def check_num_learnable(backbone: nn.Module, num_learnable: int) -> list[nn.Module]:
    """The parts ``num_learnable`` unfreezes, in order; an error when it exceeds them."""
    parts = learnable_parts(backbone)
    if num_learnable > len(parts) + 1:
        fc = " + FC" if feature_fc(backbone) is not None else ""
        raise ConfigError(
            f"cbe_expert num_learnable={num_learnable} exceeds this backbone's "
            f"{len(_stages(backbone))} stages{fc} + classifier; use -1 or 1..{len(parts) + 1}"
        )
    return parts


def apply_num_learnable(model: LTModel, num_learnable: int) -> None:
    """Freeze by ``num_learnable`` (module doc): -1 all, k >= 1 head + the first k - 1 parts."""
    if num_learnable == -1:
        return
    parts = check_num_learnable(model.backbone, num_learnable)
    freeze(model.backbone)
    for part in parts[: num_learnable - 1]:
        for p in part.parameters():
            p.requires_grad_(True)


@dataclass(frozen=True)
class CBEExpertParams:
    low: int = 0
    high: int | None = None  # None: no upper bound (the many-shot expert)
    open_ratio: float = 16.0  # in-split training images per open image
    num_learnable: int = -1
    open_seed: int = 0  # seeds the open draws (train, val, test)
    update_frozen_bn: bool = False  # True: the original code's frozen-but-updating BatchNorms
    open_class: bool = True  # False: the ablation without CBE's open (reject) output

    def __post_init__(self) -> None:
        if isinstance(self.low, bool) or not isinstance(self.low, int) or self.low < 0:
            raise ConfigError(f"cbe_expert low must be an int >= 0, got {self.low!r}")
        if self.high is not None and (not isinstance(self.high, int) or self.high <= self.low):
            raise ConfigError(
                f"cbe_expert high must be None or an int > low={self.low}, got {self.high!r}"
            )
        if isinstance(self.open_ratio, bool) or not (
            isinstance(self.open_ratio, int | float) and self.open_ratio > 0
        ):
            raise ConfigError(
                f"cbe_expert open_ratio must be > 0 (in-split images per open image, CBE: 16),"
                f" got {self.open_ratio!r}"
            )
        if not isinstance(self.num_learnable, int) or not (
            self.num_learnable == -1 or self.num_learnable >= 1
        ):
            raise ConfigError(
                f"cbe_expert num_learnable must be -1 (all) or >= 1 (1: classifier only), "
                f"got {self.num_learnable!r}"
            )


@OBJECTIVES.register("cbe_expert")
class CBEExpert(Objective):
    """An expert over one class split plus an open class (unless ``open_class=False``),
    fine-tuned from the generalist."""

    version = "1"
    Params = CBEExpertParams

    def validate(self, counts: np.ndarray) -> None:
        """A generalist input, a reachable num_learnable, classes in the split."""
        p = self.params
        generalist = need_input(self.spec, "generalist", HINT)
        check_num_learnable(skeleton(generalist, len(counts), keep_head=False), p.num_learnable)
        check_split(counts, p.low, p.high, self.spec.data.name)

    def prepare_data(self, data: LTDataset, inputs) -> LTDataset:
        self.validate(data.class_counts)
        p = self.params
        return expert_view(data, p.low, p.high, p.open_ratio, p.open_seed, p.open_class)

    def build(self, ctx: StageContext) -> nn.Module:
        backbone = rebuild_input(ctx, "generalist", keep_head=False)
        head = linear_head(backbone.feature_dim, ctx.num_classes)
        model = LTModel(backbone, head, ctx.num_classes)
        apply_num_learnable(model, self.params.num_learnable)
        if self.params.update_frozen_bn:
            model.backbone.update_batch_stats = True
        return model

    def loss(self, model: nn.Module, batch: Batch, ctx: StageContext):
        return ce_terms(model, batch)

    def rebuild(self, weights, num_classes: int, *, keep_head: bool = True) -> nn.Module:
        """The generalist's backbone with this expert's linear head (S + 1 outputs, or S)."""
        generalist = make_objective(need_input(self.spec, "generalist", HINT))
        backbone = generalist.rebuild(None, num_classes, keep_head=False)
        model = LTModel(backbone, linear_head(backbone.feature_dim, num_classes), num_classes)
        return load_weights(model, weights, keep_head=keep_head, kind="cbe_expert")
