"""The artifact rank 0 exports: model.safetensors, tables/*.parquet, metrics.json, spec.json."""

from __future__ import annotations

import json
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from torch import nn

from ray_lt.data.spec import LTDataset, Split
from ray_lt.engine.evaluation import HEAD_PREFIX, SplitOutputs, split_metrics, splits_of
from ray_lt.metrics import GROUP_NAMES, per_class_accuracy, shot_groups
from ray_lt.objective import Objective, StageContext


def export(
    out_dir: str,
    objective: Objective,
    model: nn.Module,
    outputs: dict[str, SplitOutputs],
    ctx: StageContext,
    *,
    history: list[dict[str, Any]],
    start_epoch: int,
    selected_epoch: int = 0,
) -> dict[str, Any]:
    """Write the artifact files into ``out_dir``; the test and val metrics.

    The objective may add tables of its own (``export_tables``, e.g. CBE's class masks); they
    land in ``tables/`` beside the per-sample ones.
    """
    out, spec, data = Path(out_dir), objective.spec, ctx.data
    (out / "tables").mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"))
    results: dict[str, Any] = {}
    splits = splits_of(data)
    for name, split_out in outputs.items():
        table = _table(splits[name], split_out, spec.train.export_features)
        pq.write_table(table, out / "tables" / f"{name}.parquet")
        counts = data.class_counts
        results[name] = split_metrics(split_out, splits[name], counts, data.many_inclusive)
    pq.write_table(_per_class(outputs["test"], data), out / "tables" / "per_class.parquet")
    for name, table in objective.export_tables(model, ctx).items():
        pq.write_table(table, out / "tables" / f"{name}.parquet")
    metrics = {**results, "start_epoch": start_epoch, "history": history, "node": _node()}
    if selected_epoch:
        metrics["selected_epoch"] = selected_epoch
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default))
    spec_doc = {"key": spec.key, "spec": spec.to_dict(), "versions": _versions()}
    (out / "spec.json").write_text(json.dumps(spec_doc, indent=1, default=_json_default))
    return {"test": results.get("test", {}), "val": results.get("val", {})}


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


def _per_class(test: SplitOutputs, data: LTDataset) -> pa.Table:
    """Train count, shot group and test accuracy of every class (and of every extra head)."""
    counts = data.class_counts
    per_class = {
        "class": pa.array(np.arange(data.num_classes, dtype=np.int64)),
        "train_count": pa.array(np.asarray(counts, dtype=np.int64)),
        "group": pa.array(
            [GROUP_NAMES[g] for g in shot_groups(counts, many_inclusive=data.many_inclusive)]
        ),
        "accuracy": pa.array(_class_acc(test.logits, data).astype(np.float64)),
    }
    for name, value in test.extras.items():
        if name.startswith(HEAD_PREFIX):
            head = name[len(HEAD_PREFIX) :]
            per_class[f"accuracy_{head}"] = pa.array(_class_acc(value, data).astype(np.float64))
    return pa.table(per_class)


def _fixed_list(x: torch.Tensor) -> pa.FixedSizeListArray:
    flat = pa.array(x.numpy().astype(np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1] if x.ndim > 1 else 1)


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
