"""Where the loop runs: ``RayTrainSession`` in a ``TorchTrainer`` worker, ``LocalSession`` here.

A session gives the loop its rank and device, wraps the model for DDP, takes each epoch's report
(and the checkpoint beside it) and hands back the last checkpoint to resume from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

STATE_FILE = "state.pt"


class Session(Protocol):
    """Where the loop runs: rank, device, reporting and the checkpoint to resume from."""

    world_rank: int
    world_size: int
    device: torch.device

    def wrap_model(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...

    def last_checkpoint(self) -> dict[str, Any] | None: ...


def load_state(directory: str, device: torch.device) -> dict[str, Any]:
    """A checkpoint's state; ``weights_only``: a checkpoint is data, never code (a crafted
    pickle is refused here)."""
    return torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)


class LocalSession:
    """One process, no Ray: for benchmarks, unit tests and debugging a stage."""

    world_rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device = "cpu", checkpoint_dir: str | None = None):
        self.device = torch.device(device)
        self.checkpoint_dir = checkpoint_dir
        self.reports: list[dict[str, Any]] = []

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_dir:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            tmp = Path(self.checkpoint_dir) / (STATE_FILE + ".tmp")
            os.replace(Path(checkpoint_dir) / STATE_FILE, tmp)
            os.replace(tmp, Path(self.checkpoint_dir) / STATE_FILE)

    def last_checkpoint(self) -> dict[str, Any] | None:
        if self.checkpoint_dir and (Path(self.checkpoint_dir) / STATE_FILE).exists():
            return load_state(self.checkpoint_dir, self.device)
        return None


class RayTrainSession:
    """Inside a ``TorchTrainer`` worker: DDP via Ray Train, reports and checkpoints to Ray."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = (
            ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        )
        ray.train.report(metrics, checkpoint=checkpoint)

    def last_checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_state(d, self.device)
