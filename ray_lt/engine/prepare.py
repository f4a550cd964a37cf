"""What a stage run is (``StageRun``) and what the loop prepares once before its first epoch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ray_lt.data.augment import streamed_augment
from ray_lt.data.sources import ImageSource, image_source, to_device
from ray_lt.data.spec import LTDataset
from ray_lt.engine.sessions import Session
from ray_lt.errors import ConfigError
from ray_lt.objective import Objective, StageContext, UpstreamArtifact
from ray_lt.spec import StageSpec, TrainSpec


@dataclass
class StageRun:
    """What the loop needs besides the session, all plain values."""

    spec: StageSpec
    objective: type[Objective]  # the kind's class (``get_objective``); bound to ``spec`` here
    data: LTDataset
    inputs: Mapping[str, UpstreamArtifact] = field(default_factory=dict)
    out_dir: str | None = None  # rank 0 exports the artifact files here
    fail_at_epoch: int | None = None  # fault injection for tests: raise once at this epoch
    fault_marker: str | None = None  # file that records the injected fault already happened
    fault_action: str = "raise"  # "raise" an error, or "kill" this process with SIGKILL
    progress_offset: int = 0  # added to "progress" in reports (ASHA's time attribute)


def selects_best(train: TrainSpec) -> bool:
    """Whether the exported model is the best epoch's (evaluated every epoch), not the last."""
    return train.select == "best" or train.patience > 0


@dataclass
class PreparedStage:
    """The objective, its view of the data on the device, the model and the optimiser."""

    run: StageRun
    objective: Objective
    ctx: StageContext
    model: nn.Module  # as built (never the DDP wrapper): evaluated, checkpointed, exported
    optimizer: torch.optim.Optimizer
    train_source: ImageSource
    eval_sources: dict[str, ImageSource]  # "test", "val"
    labels: torch.Tensor  # train labels, on the device
    augment: str  # the device's part of the training augmentation
    rank: int
    world: int

    @property
    def train(self) -> TrainSpec:
        return self.run.spec.train

    @property
    def data(self) -> LTDataset:
        return self.ctx.data

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def per_rank_batch(self) -> int:
        return max(self.train.batch_size // self.world, 1)

    @property
    def eval_every(self) -> int:
        return 1 if selects_best(self.train) else self.train.eval_every


def prepare(run: StageRun, session: Session) -> PreparedStage:
    """Seed, the objective's data view and sources on the device, its model, the optimiser."""
    spec, train, device = run.spec, run.spec.train, session.device
    objective = run.objective(spec)
    torch.manual_seed(train.seed)
    data = objective.prepare_data(run.data, run.inputs)
    labels = to_device(data.train.labels, device)
    if data.train.images.dtype == np.float32 and train.augment != "none":
        raise ConfigError(
            f"stage {spec.name}: its inputs are precomputed float rows, which cannot be "
            f"augmented with '{train.augment}'; set augment='none' in its TrainSpec"
        )
    if data.train.images.dtype == np.float32 and objective.second_view is not None:
        raise ConfigError(
            f"stage {spec.name}: kind '{spec.kind}' needs a second view of each image, but its "
            "inputs are precomputed float rows; give it image data"
        )
    # A streamed split may have its random resized crop taken by the CPU decoder, at the
    # augmentation's scale; the device then applies only the rest of the augmentation
    # (ray_lt.data.augment.STREAM_DEVICE_PART). The CPU also decodes the second view, if any.
    cpu_crop, augment = (
        streamed_augment(train.augment) if data.train.streamed else (None, train.augment)
    )
    train_source = image_source(
        data.train, data, device, train_crop=cpu_crop, second_view=objective.second_view
    )
    eval_sources = {
        "test": image_source(data.test, data, device),
        "val": image_source(data.val, data, device),
    }
    counts = torch.as_tensor(data.class_counts, device=device)
    ctx = StageContext(spec=spec, data=data, device=device, inputs=run.inputs, class_counts=counts)
    model = build_model(objective, ctx)
    return PreparedStage(
        run=run,
        objective=objective,
        ctx=ctx,
        model=model,
        optimizer=make_optimizer(model, train),
        train_source=train_source,
        eval_sources=eval_sources,
        labels=labels,
        augment=augment,
        rank=session.world_rank,
        world=session.world_size,
    )


def build_model(objective: Objective, ctx: StageContext) -> nn.Module:
    """The objective's model on the device, channels_last where images are (not float rows)."""
    model = objective.build(ctx).to(ctx.device)
    if ctx.channels_last and ctx.data.train.images.dtype != np.float32:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(model: nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """SGD over the trainable parameters (a dummy one for stages that train nothing)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        trainable or [torch.zeros(1, requires_grad=True)],  # epochs=0 stages train nothing
        lr=train.lr,
        momentum=train.momentum,
        nesterov=train.nesterov,
        weight_decay=train.weight_decay,
    )
