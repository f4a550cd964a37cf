"""Top-1 accuracy overall, per class and per shot group, as pure functions of arrays.

Shot groups follow the long-tail literature (Liu et al., OLTR; classifier-balancing ``shot_acc``):
many > 100 training images, medium 20-100, few < 20, computed from the per-class *training*
counts. ``many_inclusive=True`` moves a class with exactly ``many_threshold`` images into many
(many >= 100), the rule CBE's code and reports use; a dataset asks for it with
``DataSpec.many_inclusive``, so every stage's metrics and the report follow one rule. A group
accuracy is the mean of its classes' per-class accuracies (classes absent from the evaluated
labels are skipped). An empty group gives NaN and a warning, never 0, so a table can never show
a made-up number.
"""

from __future__ import annotations

import warnings

import numpy as np

MANY, MEDIUM, FEW = 0, 1, 2
GROUP_NAMES = ("many", "medium", "few")


def shot_groups(
    train_counts: np.ndarray,
    many_threshold: int = 100,
    few_threshold: int = 20,
    *,
    many_inclusive: bool = False,
) -> np.ndarray:
    """Group id per class: 0 many (> many_threshold), 2 few (< few_threshold), 1 medium.

    Args:
        train_counts: training images per class, shape [C].
        many_threshold: a class with more images than this is many-shot.
        few_threshold: a class with fewer images than this is few-shot.
        many_inclusive: a class with exactly ``many_threshold`` images is many-shot too.
    """
    counts = np.asarray(train_counts)
    groups = np.full(counts.shape, MEDIUM, dtype=np.int64)
    many = counts >= many_threshold if many_inclusive else counts > many_threshold
    groups[many] = MANY
    groups[counts < few_threshold] = FEW
    return groups


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-1 accuracy of each class, NaN for a class with no evaluated sample."""
    preds = np.asarray(preds).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} must have one shape")
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[preds == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = correct / total
    acc[total == 0] = np.nan
    return acc


def _nanmean_or_nan(values: np.ndarray, what: str) -> float:
    values = values[~np.isnan(values)]
    if values.size == 0:
        warnings.warn(f"{what} is empty: its accuracy is NaN", RuntimeWarning, stacklevel=3)
        return float("nan")
    return float(values.mean())


def shot_accuracy(
    preds: np.ndarray,
    labels: np.ndarray,
    train_counts: np.ndarray,
    many_threshold: int = 100,
    few_threshold: int = 20,
    *,
    many_inclusive: bool = False,
) -> dict[str, float]:
    """Overall (per sample), many, medium and few top-1 accuracy as fractions in [0, 1].

    Args:
        preds: predicted class per sample.
        labels: true class per sample.
        train_counts: training images per class; fixes the class count and the groups.
        many_threshold: see :func:`shot_groups`.
        few_threshold: see :func:`shot_groups`.
        many_inclusive: see :func:`shot_groups`.
    """
    preds = np.asarray(preds).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    num_classes = len(train_counts)
    out: dict[str, float] = {}
    if labels.size == 0:
        warnings.warn(
            "no evaluated samples: overall accuracy is NaN", RuntimeWarning, stacklevel=2
        )
        out["overall"] = float("nan")
    else:
        out["overall"] = float((preds == labels).mean())
    acc = per_class_accuracy(preds, labels, num_classes)
    groups = shot_groups(
        train_counts, many_threshold, few_threshold, many_inclusive=many_inclusive
    )
    for gid, name in enumerate(GROUP_NAMES):
        out[name] = _nanmean_or_nan(acc[groups == gid], f"the {name}-shot group")
    return out
