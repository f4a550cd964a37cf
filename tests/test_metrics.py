"""Hand-computed cases for ray_lt.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_lt.metrics import per_class_accuracy, shot_accuracy, shot_groups


def test_shot_groups_thresholds_are_strict():
    counts = np.array([101, 100, 20, 19, 500, 1])
    assert shot_groups(counts).tolist() == [0, 1, 1, 2, 0, 2]
    assert shot_groups(counts, many_threshold=99, few_threshold=21).tolist() == [0, 0, 2, 2, 0, 2]


def test_per_class_accuracy_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0, 0])
    acc = per_class_accuracy(preds, labels, num_classes=4)
    assert acc[:3].tolist() == [0.5, pytest.approx(2 / 3), 0.0]
    assert math.isnan(acc[3])  # class 3 never evaluated: NaN, not 0


def test_shot_accuracy_by_hand():
    # classes: 0 many (200 imgs), 1 medium (50), 2 few (5)
    counts = np.array([200, 50, 5])
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    out = shot_accuracy(preds, labels, counts)
    assert out["overall"] == pytest.approx(5 / 8)
    assert out["many"] == pytest.approx(3 / 4)
    assert out["medium"] == pytest.approx(1 / 2)
    assert out["few"] == pytest.approx(1 / 2)


def test_group_accuracy_is_mean_of_class_accuracies():
    counts = np.array([300, 200])
    labels = np.array([0, 1, 1, 1, 1])
    preds = np.array([0, 0, 0, 0, 1])
    out = shot_accuracy(preds, labels, counts)
    assert out["many"] == pytest.approx((1.0 + 0.25) / 2)
    assert out["overall"] == pytest.approx(2 / 5)


def test_empty_group_is_nan_with_a_warning():
    counts = np.array([300, 200])
    with pytest.warns(RuntimeWarning, match="few-shot group is empty"):
        out = shot_accuracy(np.array([0, 1]), np.array([0, 1]), counts)
    assert math.isnan(out["few"]) and math.isnan(out["medium"])
    assert out["many"] == 1.0


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="one shape"):
        per_class_accuracy(np.array([0, 1]), np.array([0]), 2)
