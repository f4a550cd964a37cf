"""Shared fixtures: tiny synthetic data, stage specs, and where the real CIFAR-100 lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ray_lt.data.spec import DataSpec
from ray_lt.spec import StageSpec, TrainSpec

TINY = DataSpec(
    name="synthetic_lt",
    num_classes=4,
    max_per_class=48,
    imbalance=4.0,
    test_per_class=12,
    val_per_class=4,
)


def tiny_ce(epochs: int = 2, **train: object) -> StageSpec:
    """A CE stage small enough for a few CPU seconds."""
    return StageSpec(
        kind="ce",
        data=TINY,
        train=TrainSpec(
            **{"epochs": epochs, "batch_size": 32, "lr": 0.05, "schedule": "cosine", **train}
        ),
        params={"backbone": "resnet8"},
    )


def tiny_crt(upstream: StageSpec, kind: str = "crt", **train: object) -> StageSpec:
    return StageSpec(
        kind=kind,
        data=TINY,
        train=TrainSpec(
            **{
                "epochs": 1,
                "batch_size": 32,
                "lr": 0.05,
                "schedule": "cosine",
                "sampler": "class_balanced",
                **train,
            }
        ),
        inputs={"features": upstream},
    )


def cifar_root() -> Path | None:
    """$RAY_LT_DATA when it holds CIFAR-100 as Parquet, else None (tests skip)."""
    root = os.environ.get("RAY_LT_DATA")
    if root and (Path(root) / "cifar100" / "train.parquet").exists():
        return Path(root).resolve()
    return None


requires_cifar = pytest.mark.skipif(
    cifar_root() is None,
    reason="CIFAR-100 Parquet not found: set RAY_LT_DATA to a folder with cifar100/train.parquet",
)


@pytest.fixture(scope="module")
def ray_session():
    """One in-process Ray for a module's tests (2 CPUs; the dashboard serves the state API that
    Ray Train's clean-up asks)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR")
    yield
    ray.shutdown()
