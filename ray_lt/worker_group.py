"""Train a trial's stages in one Ray Train worker group: one ``TorchTrainer`` fit per batch.

A worker group's start (a controller and its workers as new processes, each importing torch)
costs seconds to tens of seconds however small the stage; a trial used to pay it for every stage.
Here the trial hands a *batch* (stages it holds the locks of, dependencies first, all with the
same resources) to one fit, whose workers train the batch's stages one after another: each
stage is published to the store by rank 0, all ranks wait for it, and the next stage reads it.

Fault tolerance is Ray Train's, per epoch: every checkpoint names its stage
(``engine.sessions.STAGE_FILE``), so after a worker is restarted the loop resumes the stage the
checkpoint belongs to at its epoch, and skips the stages already in the store. The fit's storage
name is the batch's last stage's key, so a retried trial (a lost node, a killed driver and
``--resume``) whose batch ends at the same stage resumes from the same checkpoints. Once the fit
has published every stage, its checkpoints are deleted (``ArtifactStore.drop_train_state``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ray_lt.artifacts import Artifact, ArtifactStore
from ray_lt.engine.sessions import FINAL_FLAG
from ray_lt.errors import NonFiniteLossError, RayLtError
from ray_lt.spec import StageSpec

TORCH_BACKEND_ENV = "RAY_LT_TORCH_BACKEND"  # torch.distributed backend; default: Ray's choice
FAULT_ENV = "RAY_LT_INJECT_FAULT"  # "<stage kind>:<epoch>": raise once in that stage (tests)


def train_batch(
    batch: list[StageSpec],
    store: ArtifactStore,
    data_refs: dict[Any, Any],
    *,
    final_key: str | None,
    progress: dict[str, str] | None = None,
    metric: str = "val_overall",
    data_root: str | None = None,
) -> list[dict[str, Any]]:
    """One ``TorchTrainer.fit`` that trains every stage of ``batch`` in order.

    Args:
        batch: stages whose locks the caller holds, dependencies first, same resources.
        store: where inputs are read and artifacts published.
        data_refs: ``DataSpec`` -> object ref of the loaded dataset (filled here if missing).
        final_key: the trial's final stage: its epochs go to Tune's scheduler (None: no Tune).
        progress: stage key -> the console prefix of its start and end lines (None: no lines).
        metric: the metric shown on a stage's end line.
        data_root: where datasets are read from when a ref is missing.

    Returns:
        One summary per stage trained (``status``, ``start_epoch``, ``seconds``, ``key``).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    res = batch[0].resources
    callbacks = []
    if final_key is not None and final_key in {s.key for s in batch}:
        callbacks.append(_final_stage_to_tune())
    worker_resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        worker_resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        batch_worker,
        # Ray opens an NCCL process group for GPU workers; torch refuses NCCL where CUDA is
        # absent (GPU resources declared on a CPU machine, as the autoscaling test does):
        # RAY_LT_TORCH_BACKEND=gloo says so
        torch_config=TorchConfig(backend=os.environ.get(TORCH_BACKEND_ENV) or None),
        train_loop_config={
            "stages": [_stage_config(s, store, data_refs, data_root) for s in batch],
            "store": store.uri,
            "final_key": final_key,
            "progress": progress or {},
            "metric": metric,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=worker_resources,
        ),
        run_config=ray.train.RunConfig(
            storage_path=store.train_dir(),
            name=batch[-1].key,
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summaries = list(result.return_value or [])
    by_key = {s.key: s for s in batch}
    for summary in summaries:
        raise_if_nonfinite(by_key[summary["key"]], summary)
    store.drop_train_state(batch[-1].key)  # every stage of the batch is in the store now
    return summaries


def _final_stage_to_tune() -> Any:
    """Ray Tune's report callback, passing on only the reports of the trial's final stage (the
    others' metrics would mislead the scheduler's rungs)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class FinalStageToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if metrics and metrics[0].get(FINAL_FLAG):
                first = {k: v for k, v in metrics[0].items() if k != FINAL_FLAG}
                super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return FinalStageToTune()


def _stage_config(
    spec: StageSpec, store: ArtifactStore, data_refs: dict[Any, Any], data_root: str | None
) -> dict[str, Any]:
    """What the workers need of one stage: its spec, its dataset's ref, the fault to inject."""
    fault, action = fault_for(spec)
    return {
        "spec": spec.to_dict(),
        "key": spec.key,
        "epochs": spec.train.epochs,
        "data_ref": data_ref(spec, data_refs, data_root),
        "fail_at_epoch": fault,
        "fault_marker": fault_marker(store, spec.key, fault),
        "fault_action": action,
    }


def data_ref(spec: StageSpec, data_refs: dict[Any, Any], data_root: str | None) -> Any:
    """The dataset's object ref: the driver's if it put one, else load and put it here."""
    import ray

    from ray_lt.data import load_dataset

    if spec.data not in data_refs:
        data_refs[spec.data] = ray.put(load_dataset(spec.data, data_root))
    return data_refs[spec.data]


def fault_for(spec: StageSpec) -> tuple[int | None, str]:
    """``RAY_LT_INJECT_FAULT=<kind>:<epoch>[:kill]``: the epoch at which ``spec`` fails, and
    how: raise an error, or SIGKILL its own worker process (a real crash, seen by Ray)."""
    parts = os.environ.get(FAULT_ENV, "").split(":")
    if len(parts) < 2 or parts[0] != spec.kind:
        return None, "raise"
    action = parts[2] if len(parts) > 2 else "raise"
    if action not in ("raise", "kill"):
        raise RayLtError(f"{FAULT_ENV}={':'.join(parts)}: the action must be 'raise' or 'kill'")
    return int(parts[1]), action


def fault_marker(store: ArtifactStore, key: str, epoch: int | None) -> str | None:
    """Where an injected fault records that it happened (so it fires once per store)."""
    if epoch is None:
        return None
    base = store.train_dir()
    if "://" in base:
        base = os.path.join(tempfile.gettempdir(), "ray_lt_train")
    return os.path.join(base, "_faults", f"{key}-epoch{epoch}")


def raise_if_nonfinite(spec: StageSpec, summary: dict[str, Any]) -> None:
    if summary.get("status") == "nonfinite":
        last = summary.get("history", [{}])[-1]
        raise NonFiniteLossError(
            f"stage {spec.name} ({spec.key}): non-finite loss at epoch {last.get('epoch')} "
            f"({last.get('loss')}); lower the learning rate (lr={spec.train.lr}) or check the data"
        )


def upstream(store: ArtifactStore, inputs: dict[str, str]) -> dict[str, Any]:
    """Each input artifact as an ``UpstreamArtifact``: spec, weights, metrics and every table."""
    from ray_lt.objective import UpstreamArtifact

    out = {}
    for name, key in inputs.items():
        art = store.open(key)
        tables = {
            Path(f).stem: art.table(Path(f).stem)
            for f in art.files()
            if f.startswith("tables/") and f.endswith(".parquet")
        }
        out[name] = UpstreamArtifact(
            key=key,
            spec=art.spec(),
            state_dict=art.state_dict(),
            metrics=art.metrics(),
            tables=tables,
        )
    return out


# -- in the workers ------------------------------------------------------------------------------


def batch_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray Train worker entry: train each stage of the batch the store does not hold yet."""
    from ray_lt.engine import RayTrainSession

    store = ArtifactStore(config["store"])
    summaries = []
    datasets: dict[str, Any] = {}
    for stage in config["stages"]:
        final = stage["key"] == config["final_key"]
        session = RayTrainSession(stage["key"], final=final, epochs=stage["epochs"])
        if _agree(session, store.contains(stage["key"])):
            continue  # trained before a restart of this worker group
        prefix = config["progress"].get(stage["key"]) if session.world_rank == 0 else None
        if prefix:
            _progress(f"{prefix} | start")
        started = time.monotonic()
        echo = _echo(session, prefix, stage["epochs"], config["metric"]) if prefix else session
        summary = _train_one(stage, store, echo, datasets)
        summary["seconds"] = time.monotonic() - started
        summaries.append(summary)
        if summary["status"] != "ok":
            break  # a non-finite loss: the trial fails, the stages after it cannot train
        session.barrier()  # rank 0 has published: the next stage may read it
        if prefix:
            artifact = store.lookup(stage["key"])
            _progress(
                f"{prefix} | trained in {summary['seconds']:.1f}s | {_shown(artifact, config)}"
            )
    return summaries


def _train_one(
    stage: dict[str, Any], store: ArtifactStore, session: Any, datasets: dict[str, Any]
) -> dict[str, Any]:
    """One stage through the engine; rank 0 publishes its artifact."""
    import ray

    from ray_lt.engine import StageRun, run_stage
    from ray_lt.objective import get_objective

    spec = StageSpec.from_dict(stage["spec"])
    data_key = str(stage["data_ref"])
    if data_key not in datasets:  # consecutive stages on one dataset fetch it once
        datasets.clear()
        datasets[data_key] = ray.get(stage["data_ref"])
    out_dir = None
    if session.world_rank == 0:
        out_dir = os.path.join(tempfile.gettempdir(), f"ray_lt_out_{uuid.uuid4().hex}")
    run = StageRun(
        spec=spec,
        objective=get_objective(spec.kind),
        data=datasets[data_key],
        inputs=upstream(store, {name: up.key for name, up in spec.inputs}),
        out_dir=out_dir,
        fail_at_epoch=stage.get("fail_at_epoch"),
        fault_marker=stage.get("fault_marker"),
        fault_action=stage.get("fault_action", "raise"),
    )
    try:
        summary = run_stage(run, session)
        if out_dir and summary["status"] == "ok":
            store.put(stage["key"], out_dir)
    finally:
        if out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "key": stage["key"],
        "status": summary["status"],
        "start_epoch": summary.get("start_epoch", 0),
        "history": summary["history"][-1:],
    }


def _agree(session: Any, value: bool) -> bool:
    """Rank 0's ``value`` on every rank (they must all skip, or all train, a stage)."""
    if session.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _progress(text: str) -> None:
    from ray_lt.console import progress

    progress(text)


def _echo(session: Any, prefix: str, epochs: int, metric: str) -> Any:
    from ray_lt.console import EpochEcho

    return EpochEcho(session, prefix, epochs, metric)


def _shown(artifact: Artifact | None, config: dict[str, Any]) -> str:
    from ray_lt.console import val_metric

    return val_metric(artifact, config["metric"]) if artifact is not None else "not stored"
