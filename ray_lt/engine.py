"""The one training loop every stage runs, inside a Ray Train worker or in-process.

Read it top to bottom: put the data on the device, build the objective's model, restore the last
checkpoint if there is one, then for each epoch draw the sampler's indices, augment batches on the
device, step SGD with the scheduled learning rate, evaluate, report and checkpoint; at the end
export weights and per-sample tables. Stage objectives supply only the model and the loss terms.

The loop talks to its runner through a small ``Session`` (rank, device, report, last checkpoint):
``RayTrainSession`` inside a ``TorchTrainer`` worker, ``LocalSession`` for benchmarks and unit
tests. Both run this same function; there is no second loop.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from torch import nn

from ray_lt.data import augment_batch, draw_epoch, normalize_batch
from ray_lt.data.spec import LTDataset, Split
from ray_lt.metrics import GROUP_NAMES, per_class_accuracy, shot_accuracy, shot_groups
from ray_lt.objective import Batch, Objective, StageContext, UpstreamArtifact, parse_params
from ray_lt.spec import StageSpec, TrainSpec

EVAL_BATCH = 1024
STATE_FILE = "state.pt"


class Session(Protocol):
    """Where the loop runs: rank, device, reporting and the checkpoint to resume from."""

    world_rank: int
    world_size: int
    device: torch.device

    def wrap_model(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...

    def last_checkpoint(self) -> dict[str, Any] | None: ...


def _load_state(directory: str, device: torch.device) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code (a crafted pickle is refused here).
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
            return _load_state(self.checkpoint_dir, self.device)
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
            return _load_state(d, self.device)


@dataclass
class StageRun:
    """What the loop needs besides the session, all plain values."""

    spec: StageSpec
    objective: Objective
    data: LTDataset
    inputs: Mapping[str, UpstreamArtifact] = field(default_factory=dict)
    out_dir: str | None = None  # rank 0 exports the artifact files here
    fail_at_epoch: int | None = None  # fault injection for tests: raise once at this epoch
    fault_marker: str | None = None  # file that records the injected fault already happened
    progress_offset: int = 0  # added to "progress" in reports (ASHA's time attribute)


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


def _set_train_mode(model: nn.Module) -> None:
    """Train mode, except modules whose parameters are all frozen: they keep eval statistics."""
    model.train()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            module.eval()


def _predict(objective: Objective, params: Any, model: nn.Module, x: torch.Tensor):
    predict = getattr(objective, "predict", None)
    return predict(params, model, x) if predict else model(x)


@torch.no_grad()
def evaluate(
    objective: Objective,
    params: Any,
    model: nn.Module,
    split: Split,
    images: torch.Tensor,
    data: LTDataset,
    train: TrainSpec,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and features of a whole split (float32, on the CPU), without augmentation."""
    model.eval()
    logits, feats = [], []
    for start in range(0, len(split.labels), EVAL_BATCH):
        x = normalize_batch(images[start : start + EVAL_BATCH], data.mean, data.std)
        if device.type == "cuda" and train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=_amp(train, device)):
            f, z = _predict(objective, params, model, x)
        logits.append(z.float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(logits), torch.cat(feats)


def _amp(train: TrainSpec, device: torch.device) -> bool:
    return train.amp and device.type == "cuda"


def _eval_metrics(logits: torch.Tensor, split: Split, counts: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():  # an empty shot group is NaN by design, every epoch
        warnings.simplefilter("ignore", RuntimeWarning)
        return shot_accuracy(logits.argmax(1).numpy(), split.labels, counts)


def run_stage(run: StageRun, session: Session) -> dict[str, Any]:
    """Train one stage to the end (or to a non-finite loss) and export it from rank 0.

    Returns a summary: ``status`` ("ok" or "nonfinite"), ``start_epoch`` (0, or the epoch a
    checkpoint resumed at), the final test metrics and, on rank 0, ``out_dir``.
    """
    spec, train, device = run.spec, run.spec.train, session.device
    params = parse_params(run.objective, spec)
    torch.manual_seed(train.seed)
    data = run.data
    images = _tensor(data.train.images, device)
    labels = _tensor(data.train.labels, device)
    split_images = {
        "test": _tensor(data.test.images, device),
        "val": _tensor(data.val.images, device),
    }
    counts = data.class_counts
    ctx = StageContext(
        spec=spec,
        data=data,
        device=device,
        inputs=run.inputs,
        class_counts=torch.as_tensor(counts, device=device),
    )
    model = run.objective.build(params, ctx).to(device)
    if device.type == "cuda" and train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        trainable,
        lr=train.lr,
        momentum=train.momentum,
        nesterov=train.nesterov,
        weight_decay=train.weight_decay,
    )
    history: list[dict[str, Any]] = []
    start_epoch = 0
    state = session.last_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
    wrapped = session.wrap_model(model)
    rank, world = session.world_rank, session.world_size
    per_rank_batch = max(train.batch_size // world, 1)
    last_eval: dict[str, float] = {}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    last = False
    status = "ok"
    for epoch in range(start_epoch, train.epochs):
        if (
            run.fail_at_epoch == epoch
            and run.fault_marker
            and not os.path.exists(run.fault_marker)
        ):
            Path(run.fault_marker).parent.mkdir(parents=True, exist_ok=True)
            Path(run.fault_marker).write_text(f"injected at epoch {epoch}\n")
            raise RuntimeError(f"injected fault at epoch {epoch} (RAY_LT_INJECT_FAULT)")
        tic = time.perf_counter()
        _set_train_mode(wrapped)
        gen = torch.Generator(device=device)
        gen.manual_seed(train.seed * 100_003 + epoch)  # same epoch, same draws: exact resume
        order = draw_epoch(
            train.sampler,
            labels,
            data.num_classes,
            gen,
            epoch=epoch,
            total_epochs=train.epochs,
            **dict(train.sampler_params),
        )
        order = order[rank::world]
        steps = math.ceil(len(order) / per_rank_batch)
        sums: dict[str, torch.Tensor] = {}
        for step in range(steps):
            idx = order[step * per_rank_batch : (step + 1) * per_rank_batch]
            raw = images[idx]
            x = augment_batch(train.augment, raw, gen, data.mean, data.std)
            if device.type == "cuda" and train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = Batch(x=x, y=labels[idx], index=idx, raw=raw, generator=gen)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(train, epoch + step / steps)
            with torch.autocast(device.type, torch.bfloat16, enabled=_amp(train, device)):
                terms = run.objective.loss(params, wrapped, batch, ctx)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        epoch_loss = {f"loss/{k}": float(v) / steps for k, v in sums.items()}
        epoch_loss["loss"] = sum(epoch_loss.values())
        seconds = time.perf_counter() - tic
        if not math.isfinite(epoch_loss["loss"]):
            status = "nonfinite"
            history.append({"epoch": epoch + 1, **epoch_loss, "status": status})
            break
        last = epoch + 1 == train.epochs
        if rank == 0 and (last or (epoch + 1) % train.eval_every == 0):
            outputs = evaluate_splits(run, params, model, split_images, device)
            last_eval = {}
            for name, (logits, _) in outputs.items():
                split_metrics = _eval_metrics(logits, getattr(data, name), counts)
                prefix = "" if name == "test" else f"{name}_"
                last_eval.update({f"{prefix}{k}": v for k, v in split_metrics.items()})
        metrics = {
            "epoch": epoch + 1,
            "progress": run.progress_offset + epoch + 1,
            "lr": lr_at(train, epoch + 1 - 1e-9),
            **epoch_loss,
            "epoch_s": seconds,
            "images_per_s": len(order) * world / max(seconds, 1e-9),
            **last_eval,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "history": json.dumps(history),
                    },
                    Path(tmp) / STATE_FILE,
                )
            session.report(metrics, tmp if rank == 0 else None)
    summary: dict[str, Any] = {"status": status, "start_epoch": start_epoch, "history": history}
    if status == "ok" and rank == 0 and run.out_dir:
        if outputs is None or not last:  # resumed after the last epoch: evaluate once more
            outputs = evaluate_splits(run, params, model, split_images, device)
        summary.update(export(run, model, outputs, history, start_epoch))
        summary["out_dir"] = run.out_dir
    return summary


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # Arrays from the object store are read-only; the engine never writes them.
    if not array.flags.writeable:
        array = array.copy() if device.type == "cpu" else array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(device)


def evaluate_splits(
    run: StageRun,
    params: Any,
    model: nn.Module,
    split_images: Mapping[str, torch.Tensor],
    device: torch.device,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(logits, features) of the test split and, when it has images, the validation split."""
    out = {}
    for name in ("test", "val"):
        split = getattr(run.data, name)
        if len(split.labels):
            out[name] = evaluate(
                run.objective,
                params,
                model,
                split,
                split_images[name],
                run.data,
                run.spec.train,
                device,
            )
    return out


def _table(split: Split, logits: torch.Tensor, feats: torch.Tensor | None) -> pa.Table:
    columns = {
        "index": pa.array(np.arange(len(split.labels), dtype=np.int64)),
        "source_index": pa.array(split.source_index.astype(np.int64)),
        "label": pa.array(split.labels.astype(np.int64)),
        "logits": _fixed_list(logits),
    }
    if feats is not None:
        columns["features"] = _fixed_list(feats)
    return pa.table(columns)


def _fixed_list(x: torch.Tensor) -> pa.FixedSizeListArray:
    flat = pa.array(x.numpy().astype(np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])


def export(
    run: StageRun,
    model: nn.Module,
    outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    history: list[dict],
    start_epoch: int,
) -> dict[str, Any]:
    """Write model.safetensors, tables/*.parquet, metrics.json and spec.json into out_dir."""
    out = Path(run.out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    data, train, counts = run.data, run.spec.train, run.data.class_counts
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"))
    results: dict[str, Any] = {}
    for name, (logits, feats) in outputs.items():
        split = getattr(data, name)
        pq.write_table(
            _table(split, logits, feats if train.export_features else None),
            out / "tables" / f"{name}.parquet",
        )
        results[name] = _eval_metrics(logits, split, counts)
    test_logits = outputs["test"][0]
    acc = per_class_accuracy(test_logits.argmax(1).numpy(), data.test.labels, data.num_classes)
    pq.write_table(
        pa.table(
            {
                "class": pa.array(np.arange(data.num_classes, dtype=np.int64)),
                "train_count": pa.array(np.asarray(counts, dtype=np.int64)),
                "group": pa.array([GROUP_NAMES[g] for g in shot_groups(counts)]),
                "accuracy": pa.array(acc.astype(np.float64)),
            }
        ),
        out / "tables" / "per_class.parquet",
    )
    metrics = {**results, "start_epoch": start_epoch, "history": history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default))
    spec_doc = {"key": run.spec.key, "spec": run.spec.to_dict(), "versions": _versions()}
    (out / "spec.json").write_text(json.dumps(spec_doc, indent=1, default=_json_default))
    return {"test": results.get("test", {}), "val": results.get("val", {})}


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _versions() -> dict[str, str]:
    import ray_lt

    return {"ray_lt": ray_lt.__version__, "torch": torch.__version__}
