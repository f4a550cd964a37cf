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
import signal
import socket
import sys
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
from ray_lt.data.augment import streamed_augment
from ray_lt.data.sources import ImageSource, image_source, to_device
from ray_lt.data.spec import LTDataset, Split
from ray_lt.errors import ConfigError
from ray_lt.metrics import GROUP_NAMES, per_class_accuracy, shot_accuracy, shot_groups
from ray_lt.objective import Batch, Objective, StageContext, UpstreamArtifact, parse_params
from ray_lt.spec import StageSpec, TrainSpec

EVAL_BATCH = 1024
KILL_DELAY_S = 3.0  # an injected kill waits this long into its epoch, as a crash mid-epoch would
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
    fault_action: str = "raise"  # "raise" an error, or "kill" this process with SIGKILL
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


BATCH_STATS_ATTR = "update_batch_stats"


def _set_train_mode(model: nn.Module) -> None:
    """Train mode, except modules whose parameters are all frozen: they keep eval statistics.

    A module an objective marks with ``update_batch_stats = True`` stays in train mode with
    everything below it, frozen or not: MoCo's key encoder, or the original code's quirk of
    re-estimating a frozen encoder's BatchNorm statistics, as a named option.
    """
    model.train()
    keep: set[int] = set()
    for module in model.modules():
        if getattr(module, BATCH_STATS_ATTR, False):
            keep.update(id(m) for m in module.modules())
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params) and id(module) not in keep:
            module.eval()


HEAD_PREFIX = "logits_"  # an extra output named logits_<head> is scored as metrics <head>_*


@dataclass
class SplitOutputs:
    """A split's evaluation: primary logits, features and the objective's extra outputs.

    Extras are exported as table columns; those named ``logits_<head>`` are further heads over
    the same classes (SSD-LT's soft head), scored beside the primary one as ``<head>_overall``...
    """

    logits: torch.Tensor
    features: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def _predict(objective: Objective, params: Any, model: nn.Module, x: torch.Tensor):
    """``(features, logits, extras)``; ``predict`` may return the pair or the triple."""
    predict = getattr(objective, "predict", None)
    out = predict(params, model, x) if predict else model(x)
    return (out[0], out[1], dict(out[2])) if len(out) == 3 else (out[0], out[1], {})


def _inputs(
    raw: torch.Tensor,
    data: LTDataset,
    train: TrainSpec,
    device: torch.device,
    gen=None,
    augment: str | None = None,
) -> torch.Tensor:
    """The model's input batch: augmented (training) or normalised images, or float rows as is.

    ``augment`` overrides ``train.augment`` (a streamed split whose crop the CPU already took).
    """
    if raw.dtype != torch.uint8:  # precomputed features / logits: nothing to augment
        return raw
    if gen is None:
        x = normalize_batch(raw, data.mean, data.std)
    else:
        x = augment_batch(augment or train.augment, raw, gen, data.mean, data.std)
    if device.type == "cuda" and train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(
    objective: Objective,
    params: Any,
    model: nn.Module,
    split: Split,
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
        x = _inputs(raw, data, train, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=_amp(train, device)):
            f, z, more = _predict(objective, params, model, x)
        logits.append(z.float().cpu())
        feats.append(f.float().cpu())
        for name, value in more.items():
            extras.setdefault(name, []).append(value.float().cpu())
    if not logits:
        return SplitOutputs(torch.zeros(0, data.num_classes), torch.zeros(0, 0))
    return SplitOutputs(
        torch.cat(logits), torch.cat(feats), {k: torch.cat(v) for k, v in extras.items()}
    )


def _amp(train: TrainSpec, device: torch.device) -> bool:
    return train.amp and device.type == "cuda"


def _eval_metrics(logits: torch.Tensor, split: Split, counts: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():  # an empty shot group is NaN by design, every epoch
        warnings.simplefilter("ignore", RuntimeWarning)
        return shot_accuracy(logits.argmax(1).numpy(), split.labels, counts)


def split_metrics(out: SplitOutputs, split: Split, counts: np.ndarray) -> dict[str, float]:
    """Shot-group accuracies of the primary logits and of every ``logits_<head>`` extra."""
    metrics = _eval_metrics(out.logits, split, counts)
    for name, value in out.extras.items():
        if name.startswith(HEAD_PREFIX):
            head = name[len(HEAD_PREFIX) :]
            scored = _eval_metrics(value, split, counts)
            metrics.update({f"{head}_{k}": v for k, v in scored.items()})
    return metrics


def prepare_data(
    objective: Objective,
    params: Any,
    data: LTDataset,
    inputs: Mapping[str, UpstreamArtifact],
) -> LTDataset:
    """The data the stage trains and evaluates on: the objective's view of it, or the dataset.

    An objective may define ``prepare_data(params, data, inputs)`` to train on a subset with its
    own labels (CBE's experts and their open class) or on precomputed float rows read from its
    upstream tables (CBE's calibration on logits).
    """
    prepare = getattr(objective, "prepare_data", None)
    return prepare(params, data, inputs) if prepare else data


def _selects_best(train: TrainSpec) -> bool:
    return train.select == "best" or train.patience > 0


def _score(metrics: dict[str, float], train: TrainSpec) -> float:
    value = metrics.get(train.select_metric)
    if value is None or not math.isfinite(value):
        raise ConfigError(
            f"model selection needs '{train.select_metric}' every epoch, got {value!r} (known: "
            f"{sorted(metrics)}); set select_metric to one of them, or select='last', patience=0"
        )
    return float(value)


def run_stage(run: StageRun, session: Session) -> dict[str, Any]:
    """Train one stage to the end (or to a non-finite loss) and export it from rank 0.

    Returns a summary: ``status`` ("ok" or "nonfinite"), ``start_epoch`` (0, or the epoch a
    checkpoint resumed at), the final test metrics and, on rank 0, ``out_dir``. With
    ``select="best"`` (or ``patience``) the exported model is the best epoch's by
    ``select_metric``, and training stops after ``patience`` epochs without a gain.
    """
    spec, train, device = run.spec, run.spec.train, session.device
    params = parse_params(run.objective, spec)
    torch.manual_seed(train.seed)
    data = prepare_data(run.objective, params, run.data, run.inputs)
    labels = to_device(data.train.labels, device)
    if data.train.images.dtype == np.float32 and train.augment != "none":
        raise ConfigError(
            f"stage {spec.name}: its inputs are precomputed float rows, which cannot be "
            f"augmented with '{train.augment}'; set augment='none' in its TrainSpec"
        )
    # A streamed split may have its random resized crop taken by the CPU decoder; the device
    # then applies only the rest of the augmentation (ray_lt.data.augment.STREAM_DEVICE_PART).
    cpu_crop, augment = (
        streamed_augment(train.augment) if data.train.streamed else (False, train.augment)
    )
    train_source = image_source(data.train, data, device, train_crop=cpu_crop)
    split_images = {
        "test": image_source(data.test, data, device),
        "val": image_source(data.val, data, device),
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
    if device.type == "cuda" and train.channels_last and data.train.images.dtype != np.float32:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        trainable or [torch.zeros(1, requires_grad=True)],  # epochs=0 stages train nothing
        lr=train.lr,
        momentum=train.momentum,
        nesterov=train.nesterov,
        weight_decay=train.weight_decay,
    )
    history: list[dict[str, Any]] = []
    start_epoch = 0
    best: dict[str, Any] = {"score": -math.inf, "epoch": 0, "state": None}
    state = session.last_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
        if "best_state" in state:
            best = {
                "score": float(state["best_score"]),
                "epoch": int(state["best_epoch"]),
                "state": state["best_state"],
            }
    wrapped = session.wrap_model(model)
    rank, world = session.world_rank, session.world_size
    per_rank_batch = max(train.batch_size // world, 1)
    eval_every = 1 if _selects_best(train) else train.eval_every
    last_eval: dict[str, float] = {}
    outputs: dict[str, SplitOutputs] | None = None
    last = False
    status = "ok"
    for epoch in range(start_epoch, train.epochs):
        if train.patience and epoch - best["epoch"] >= train.patience and best["epoch"]:
            break  # resumed after the patience ran out
        if (
            run.fail_at_epoch == epoch
            and run.fault_marker
            and not os.path.exists(run.fault_marker)
        ):
            Path(run.fault_marker).parent.mkdir(parents=True, exist_ok=True)
            Path(run.fault_marker).write_text(f"injected at epoch {epoch}\n")
            if run.fault_action == "kill":  # a real process death, as an OOM kill or a crash
                # partway into the epoch: the checkpoints already reported have had time to be
                # registered by Ray Train's controller (tiny test epochs last 0.2 s)
                time.sleep(KILL_DELAY_S)
                os.kill(os.getpid(), signal.SIGKILL)
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
        batches = train_source.train_batches(
            order, per_rank_batch, seed=int(order_seed(train, epoch, rank))
        )
        for step, (idx, raw) in enumerate(batches):
            x = _inputs(raw, data, train, device, gen, augment)
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
        if rank == 0 and (last or (epoch + 1) % eval_every == 0):
            outputs = evaluate_splits(run, params, model, split_images, device, data)
            last_eval = {}
            for name, out in outputs.items():
                prefix = "" if name == "test" else f"{name}_"
                metrics_ = split_metrics(out, getattr(data, name), counts)
                last_eval.update({f"{prefix}{k}": v for k, v in metrics_.items()})
        stop = False
        if _selects_best(train) and rank == 0:
            score = _score(last_eval, train)
            if score > best["score"]:
                best = {"score": score, "epoch": epoch + 1, "state": _cpu_state(model)}
            stop = bool(train.patience) and epoch + 1 - best["epoch"] >= train.patience
        if _selects_best(train) and world > 1:  # rank 0 decides; every rank stops together
            flag = torch.tensor([float(stop)], device=device)
            torch.distributed.broadcast(flag, src=0)
            stop = bool(flag.item())
        metrics = {
            "epoch": epoch + 1,
            "progress": run.progress_offset + epoch + 1,
            "lr": lr_at(train, epoch + 1 - 1e-9),
            **epoch_loss,
            "epoch_s": seconds,
            "images_per_s": len(order) * world / max(seconds, 1e-9),
            **last_eval,
        }
        if _selects_best(train):
            metrics["best_epoch"] = best["epoch"]
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                checkpoint = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": json.dumps(history),
                }
                if best["state"] is not None:
                    checkpoint.update(
                        best_state=best["state"],
                        best_score=torch.tensor(best["score"], dtype=torch.float64),
                        best_epoch=best["epoch"],
                    )
                torch.save(checkpoint, Path(tmp) / STATE_FILE)
            session.report(metrics, tmp if rank == 0 else None)
        if stop:
            break
    summary: dict[str, Any] = {"status": status, "start_epoch": start_epoch, "history": history}
    if status == "ok" and rank == 0 and run.out_dir:
        if best["state"] is not None:  # export the selected epoch, not the last one
            model.load_state_dict(best["state"])
            outputs = None
        if outputs is None or not last:  # resumed after the last epoch, or a selected epoch
            outputs = evaluate_splits(run, params, model, split_images, device, data)
        summary.update(
            export(run, model, outputs, history, start_epoch, data, params, ctx, best["epoch"])
        )
        summary["out_dir"] = run.out_dir
    return summary


def order_seed(train: TrainSpec, epoch: int, rank: int) -> int:
    """Seed of a streamed epoch's CPU crops: fixed by the stage seed, the epoch and the rank."""
    return (train.seed * 100_003 + epoch) * 1_009 + rank


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def evaluate_splits(
    run: StageRun,
    params: Any,
    model: nn.Module,
    split_images: Mapping[str, ImageSource],
    device: torch.device,
    data: LTDataset,
) -> dict[str, SplitOutputs]:
    """Outputs of the test split and, when it has images, the validation split."""
    out = {}
    for name in ("test", "val"):
        split = getattr(data, name)
        if len(split.labels) or name == "test":
            out[name] = evaluate(
                run.objective,
                params,
                model,
                split,
                split_images[name],
                data,
                run.spec.train,
                device,
            )
    return out


def _table(split: Split, out: SplitOutputs, with_features: bool) -> pa.Table:
    columns = {
        "index": pa.array(np.arange(len(split.labels), dtype=np.int64)),
        "source_index": pa.array(split.source_index.astype(np.int64)),
        "label": pa.array(split.labels.astype(np.int64)),
        "logits": _fixed_list(out.logits),
    }
    if with_features:
        columns["features"] = _fixed_list(out.features)
    for name, value in out.extras.items():
        columns[name] = _fixed_list(value)
    return pa.table(columns)


def _fixed_list(x: torch.Tensor) -> pa.FixedSizeListArray:
    flat = pa.array(x.numpy().astype(np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1] if x.ndim > 1 else 1)


def export(
    run: StageRun,
    model: nn.Module,
    outputs: Mapping[str, SplitOutputs],
    history: list[dict],
    start_epoch: int,
    data: LTDataset,
    params: Any = None,
    ctx: StageContext | None = None,
    selected_epoch: int = 0,
) -> dict[str, Any]:
    """Write model.safetensors, tables/*.parquet, metrics.json and spec.json into out_dir.

    An objective may add tables of its own with ``export_tables(params, model, ctx)`` (e.g.
    CBE's class masks); they land in ``tables/`` beside the per-sample ones.
    """
    out = Path(run.out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    train, counts = run.spec.train, data.class_counts
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"))
    results: dict[str, Any] = {}
    for name, split_out in outputs.items():
        split = getattr(data, name)
        pq.write_table(
            _table(split, split_out, train.export_features), out / "tables" / f"{name}.parquet"
        )
        results[name] = split_metrics(split_out, split, counts)
    test = outputs["test"]
    per_class = {
        "class": pa.array(np.arange(data.num_classes, dtype=np.int64)),
        "train_count": pa.array(np.asarray(counts, dtype=np.int64)),
        "group": pa.array([GROUP_NAMES[g] for g in shot_groups(counts)]),
        "accuracy": pa.array(_class_acc(test.logits, data).astype(np.float64)),
    }
    for name, value in test.extras.items():
        if name.startswith(HEAD_PREFIX):
            head = name[len(HEAD_PREFIX) :]
            per_class[f"accuracy_{head}"] = pa.array(_class_acc(value, data).astype(np.float64))
    pq.write_table(pa.table(per_class), out / "tables" / "per_class.parquet")
    more = getattr(run.objective, "export_tables", None)
    if more is not None:
        for name, table in more(params, model, ctx).items():
            pq.write_table(table, out / "tables" / f"{name}.parquet")
    metrics = {**results, "start_epoch": start_epoch, "history": history, "node": _node()}
    if selected_epoch:
        metrics["selected_epoch"] = selected_epoch
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default))
    spec_doc = {"key": run.spec.key, "spec": run.spec.to_dict(), "versions": _versions()}
    (out / "spec.json").write_text(json.dumps(spec_doc, indent=1, default=_json_default))
    return {"test": results.get("test", {}), "val": results.get("val", {})}


def _class_acc(logits: torch.Tensor, data: LTDataset) -> np.ndarray:
    with warnings.catch_warnings():  # a class without test images is NaN by design
        warnings.simplefilter("ignore", RuntimeWarning)
        return per_class_accuracy(logits.argmax(1).numpy(), data.test.labels, data.num_classes)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _node() -> dict[str, str]:
    """Where the stage ran (the Ray node id when inside Ray), for the cluster tests and users."""
    node = {"hostname": socket.gethostname()}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        node["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return node


def _versions() -> dict[str, str]:
    import ray_lt

    return {"ray_lt": ray_lt.__version__, "torch": torch.__version__}
