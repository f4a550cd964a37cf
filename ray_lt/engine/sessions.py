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
STAGE_FILE = "stage_key.txt"  # in every Ray Train checkpoint: the stage it belongs to
FINAL_FLAG = "_ray_lt_final"  # in a report: an epoch of the trial's final stage (for Tune)


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


def to_scheduler(metrics: dict[str, Any], epochs: int) -> bool:
    """Whether a final stage's epoch report goes to Tune's scheduler: all but the last epoch's.

    ASHA may stop a trial at any report it sees; stopped at its last epoch, a trial would lose
    the stage it has just finished training, before it is exported. The trial's own closing
    report carries the final metrics (without an epoch, which the scheduler ignores).
    """
    return int(metrics.get("epoch", 0)) < epochs


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
    """Inside a ``TorchTrainer`` worker: DDP via Ray Train, reports and checkpoints to Ray.

    One worker group trains several stages in turn (``ray_lt.worker_group``), so a session is
    per stage: its checkpoints carry the stage's key (``STAGE_FILE``), and the checkpoint Ray
    hands back after a restart is resumed only by the stage it belongs to. ``final`` marks the
    reports of the trial's final stage, the only ones passed on to Tune's scheduler, except its
    last epoch's (``to_scheduler``).
    """

    def __init__(self, stage_key: str = "", final: bool = False, epochs: int = 0) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.stage_key = stage_key
        self.final = final
        self.epochs = epochs
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = _usable(ray.train.torch.get_device())

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = None
        if checkpoint_dir:
            (Path(checkpoint_dir) / STAGE_FILE).write_text(self.stage_key)
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
        if self.final and to_scheduler(metrics, self.epochs):
            metrics = {**metrics, FINAL_FLAG: True}
        ray.train.report(metrics, checkpoint=checkpoint)

    def last_checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            named = Path(d) / STAGE_FILE
            if named.exists() and named.read_text() != self.stage_key:
                return None  # another stage's: this one starts afresh
            return load_state(d, self.device)

    def barrier(self) -> None:
        """Every rank waits here (a stage's artifact is published before the next reads it)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


CPU_IF_NO_CUDA_ENV = "RAY_LT_CPU_IF_NO_CUDA"  # "1": a GPU torch cannot see means the CPU


def _usable(device: torch.device) -> torch.device:
    """Ray's device for this worker. A GPU that torch cannot see (a node whose NVIDIA driver
    is broken, or whose GPU count was declared by hand: ``ray start --num-gpus``, a cluster
    config) fails the stage with the cause, unless ``RAY_LT_CPU_IF_NO_CUDA=1`` says to train
    on the CPU instead, as the autoscaling test's fake GPU workers do."""
    if device.type != "cuda" or torch.cuda.is_available():
        return device
    if os.environ.get(CPU_IF_NO_CUDA_ENV) != "1":
        raise RuntimeError(
            "Ray gave this stage's worker a GPU, but torch finds no CUDA device on its node: "
            "check the node's NVIDIA driver and the GPU count it declares to Ray "
            f"({CPU_IF_NO_CUDA_ENV}=1 trains on the CPU instead)"
        )
    return torch.device("cpu")
