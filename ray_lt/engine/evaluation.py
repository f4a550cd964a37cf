"""Evaluation: a split's logits, features and the objective's extra outputs, and their scores.

Extras are exported as table columns; those named ``logits_<head>`` are further heads over the
same classes (SSD-LT's soft head), scored beside the primary one as ``<head>_overall``...
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ray_lt.data.sources import ImageSource
from ray_lt.data.spec import LTDataset, Split
from ray_lt.engine.epoch import amp_enabled, model_inputs
from ray_lt.metrics import shot_accuracy
from ray_lt.objective import Objective
from ray_lt.spec import TrainSpec

EVAL_BATCH = 1024
HEAD_PREFIX = "logits_"  # an extra output named logits_<head> is scored as metrics <head>_*


@dataclass
class SplitOutputs:
    """A split's evaluation: primary logits, features and the objective's extra outputs."""

    logits: torch.Tensor
    features: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def splits_of(data: LTDataset) -> dict[str, Split]:
    """The evaluated splits by name."""
    return {"test": data.test, "val": data.val}


def _predict(objective: Objective, model: nn.Module, x: torch.Tensor):
    """``(features, logits, extras)``; ``predict`` may return the pair or the triple."""
    out = objective.predict(model, x)
    return (out[0], out[1], dict(out[2])) if len(out) == 3 else (out[0], out[1], {})


@torch.no_grad()
def evaluate(
    objective: Objective,
    model: nn.Module,
    source: ImageSource,
    data: LTDataset,
    train: TrainSpec,
    device: torch.device,
) -> SplitOutputs:
    """Logits, features and extras of a whole split (float32, on the CPU), no augmentation."""
    model.eval()
    logits, feats, extras = [], [], {}
    expected = 0
    for rows, raw in source.eval_batches(EVAL_BATCH):
        assert int(rows[0]) == expected, (int(rows[0]), expected)  # row order, always
        expected += len(rows)
        x = model_inputs(raw, data, train, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp_enabled(train, device)):
            f, z, more = _predict(objective, model, x)
        logits.append(z.float().cpu())
        feats.append(f.float().cpu())
        for name, value in more.items():
            extras.setdefault(name, []).append(value.float().cpu())
    if not logits:
        return SplitOutputs(torch.zeros(0, data.num_classes), torch.zeros(0, 0))
    return SplitOutputs(
        torch.cat(logits), torch.cat(feats), {k: torch.cat(v) for k, v in extras.items()}
    )


def evaluate_splits(
    objective: Objective,
    model: nn.Module,
    sources: dict[str, ImageSource],
    data: LTDataset,
    train: TrainSpec,
    device: torch.device,
) -> dict[str, SplitOutputs]:
    """Outputs of the test split and, when it has images, the validation split."""
    return {
        name: evaluate(objective, model, sources[name], data, train, device)
        for name, split in splits_of(data).items()
        if len(split.labels) or name == "test"
    }


def _eval_metrics(
    logits: torch.Tensor, split: Split, counts: np.ndarray, many_inclusive: bool
) -> dict[str, float]:
    with warnings.catch_warnings():  # an empty shot group is NaN by design, every epoch
        warnings.simplefilter("ignore", RuntimeWarning)
        preds = logits.argmax(1).numpy()
        return shot_accuracy(preds, split.labels, counts, many_inclusive=many_inclusive)


def split_metrics(
    out: SplitOutputs, split: Split, counts: np.ndarray, many_inclusive: bool = False
) -> dict[str, float]:
    """Shot-group accuracies of the primary logits and of every ``logits_<head>`` extra
    (``many_inclusive``: the dataset's shot rule, ``LTDataset.many_inclusive``)."""
    metrics = _eval_metrics(out.logits, split, counts, many_inclusive)
    for name, value in out.extras.items():
        if name.startswith(HEAD_PREFIX):
            head = name[len(HEAD_PREFIX) :]
            scored = _eval_metrics(value, split, counts, many_inclusive)
            metrics.update({f"{head}_{k}": v for k, v in scored.items()})
    return metrics


def eval_metrics(outputs: dict[str, SplitOutputs], data: LTDataset) -> dict[str, float]:
    """Every evaluated split's metrics in one report: test as is, the others ``<split>_*``."""
    splits, counts = splits_of(data), data.class_counts
    metrics: dict[str, float] = {}
    for name, out in outputs.items():
        prefix = "" if name == "test" else f"{name}_"
        scored = split_metrics(out, splits[name], counts, data.many_inclusive)
        metrics.update({f"{prefix}{k}": v for k, v in scored.items()})
    return metrics
