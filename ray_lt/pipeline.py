"""A trial: walk a stage DAG in dependency order, reusing or training each stage.

For each stage: if the store holds its key, reuse it; otherwise take the key's lock (a second
trial needing the same stage waits, then reuses), train it as one Ray Train ``TorchTrainer`` fit
whose rank-0 worker publishes the artifact, and mirror it to MLflow. The dataset travels to the
workers through the Ray object store (put once by the sweep driver), upstream weights through the
store by key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_lt.artifacts import Artifact, ArtifactStore
from ray_lt.errors import NonFiniteLossError, RayLtError
from ray_lt.spec import StageSpec, walk

FAULT_ENV = "RAY_LT_INJECT_FAULT"  # "<stage kind>:<epoch>": raise once in that stage (tests)


@dataclass
class TrialContext:
    """What a trial needs to run its stages; all plain values, cheap to ship to an actor."""

    store_uri: str
    data_refs: dict[Any, Any] = field(default_factory=dict)  # DataSpec -> ObjectRef
    data_root: str | None = None
    mirror: Any = None  # ray_lt.mirror.TrialMirror, or None for no MLflow
    owner: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")
    report_to_tune: bool = False  # the final stage's epochs feed Tune's scheduler
    in_process: str | None = None  # a torch device: train here, without Ray (benchmarks, debug)


@dataclass
class StageOutcome:
    spec: StageSpec
    artifact: Artifact
    reused: bool


def run_pipeline(final: StageSpec, ctx: TrialContext) -> list[StageOutcome]:
    """Every stage of ``final``'s DAG, dependencies first; the last outcome is ``final``'s."""
    store = ArtifactStore(ctx.store_uri)
    outcomes = []
    for spec in walk(final):
        outcome = ensure_stage(spec, store, ctx, is_final=spec.key == final.key)
        outcomes.append(outcome)
        if ctx.mirror is not None:
            ctx.mirror.log_stage(
                outcome.artifact, reused=outcome.reused, final=spec.key == final.key
            )
    return outcomes


def ensure_stage(
    spec: StageSpec, store: ArtifactStore, ctx: TrialContext, *, is_final: bool
) -> StageOutcome:
    """Reuse the stored artifact of ``spec`` or train it, never twice at once."""
    key = spec.key
    found = store.lookup(key)
    if found is not None:
        return StageOutcome(spec, found, reused=True)
    lock = store.lock(key, ctx.owner)
    if not lock.acquire(should_stop=lambda: store.contains(key)):
        found = store.lookup(key)
        if found is not None:
            return StageOutcome(spec, found, reused=True)
        lock.acquire()
    try:
        found = store.lookup(key)  # finished by another trial while we took the lock
        if found is not None:
            return StageOutcome(spec, found, reused=True)
        to_tune = ctx.report_to_tune and is_final
        if ctx.in_process or spec.resources.inline or _in_trial(spec):
            train_stage_in_process(spec, store, ctx, report_to_tune=to_tune)
        else:
            train_stage(spec, store, ctx, report_to_tune=to_tune)
        artifact = store.lookup(key)
        if artifact is None:
            raise RayLtError(f"stage {spec.name} ({key}) finished but left no valid artifact")
        return StageOutcome(spec, artifact, reused=False)
    finally:
        lock.release()


def _in_trial(spec: StageSpec) -> bool:
    """Cheap CPU stages (an objective with ``in_trial = True``) run in the trial's process."""
    from ray_lt.objective import get_objective

    return get_objective(spec.kind).in_trial


def _fault_for(spec: StageSpec) -> tuple[int | None, str]:
    """``RAY_LT_INJECT_FAULT=<kind>:<epoch>[:kill]``: the epoch at which ``spec`` fails, and
    how: raise an error, or SIGKILL its own worker process (a real crash, seen by Ray)."""
    parts = os.environ.get(FAULT_ENV, "").split(":")
    if len(parts) < 2 or parts[0] != spec.kind:
        return None, "raise"
    action = parts[2] if len(parts) > 2 else "raise"
    if action not in ("raise", "kill"):
        raise RayLtError(f"{FAULT_ENV}={':'.join(parts)}: the action must be 'raise' or 'kill'")
    return int(parts[1]), action


def _fault_marker(store: ArtifactStore, key: str, epoch: int | None) -> str | None:
    """Where an injected fault records that it happened (so it fires once per store)."""
    if epoch is None:
        return None
    base = store.train_dir()
    if "://" in base:
        base = os.path.join(tempfile.gettempdir(), "ray_lt_train")
    return os.path.join(base, "_faults", f"{key}-epoch{epoch}")


def data_ref(spec: StageSpec, ctx: TrialContext) -> Any:
    """The dataset's object ref: the driver's if it put one, else load and put it here."""
    import ray

    from ray_lt.data import load_dataset

    if spec.data not in ctx.data_refs:
        ctx.data_refs[spec.data] = ray.put(load_dataset(spec.data, ctx.data_root))
    return ctx.data_refs[spec.data]


def train_stage(
    spec: StageSpec, store: ArtifactStore, ctx: TrialContext, *, report_to_tune: bool
) -> dict[str, Any]:
    """One ``TorchTrainer.fit``; its storage name is the key, so a rerun resumes its checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    key = spec.key
    res = spec.resources
    callbacks = []
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    worker_resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        worker_resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config=_worker_config(spec, store, ctx),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=worker_resources,
        ),
        run_config=ray.train.RunConfig(
            storage_path=store.train_dir(),
            name=key,
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    summary = result.return_value or {}
    _raise_if_nonfinite(spec, summary)
    return summary


def _worker_config(spec: StageSpec, store: ArtifactStore, ctx: TrialContext) -> dict[str, Any]:
    """What ``stage_worker`` needs: the spec, the store, object refs of the data and inputs, and
    the fault to inject (tests)."""
    import ray

    fault, fault_action = _fault_for(spec)
    # Upstream weights and tables are read from the store once, here, and reach every worker
    # through the object store (Arrow tables and tensors without a copy per worker).
    inputs = upstream(store, {name: up.key for name, up in spec.inputs})
    return {
        "spec": spec.to_dict(),
        "key": spec.key,
        "store": store.uri,
        "data_ref": data_ref(spec, ctx),
        "inputs_ref": ray.put(inputs),
        "fail_at_epoch": fault,
        "fault_marker": _fault_marker(store, spec.key, fault),
        "fault_action": fault_action,
    }


def _raise_if_nonfinite(spec: StageSpec, summary: dict[str, Any]) -> None:
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


def train_stage_in_process(
    spec: StageSpec, store: ArtifactStore, ctx: TrialContext, *, report_to_tune: bool = False
) -> None:
    """The same engine and objective in this process (no Ray): checkpoints under _train/<key>.

    Used for ``TrialContext.in_process`` (benchmarks, debugging), for ``in_trial`` objectives
    (CBE's calibration), which are cheap and CPU-only by contract, and for stages with
    ``Resources(num_workers=0)`` (tiny stages, where a worker group's start would dominate).
    With ``report_to_tune`` (a trial's final stage) each epoch's report also goes to Tune, as a
    ``TorchTrainer`` stage's does, so the sweep's scheduler sees the epochs of every final stage.
    """
    from ray_lt.data import load_dataset
    from ray_lt.engine import LocalSession, StageRun, run_stage
    from ray_lt.objective import get_objective

    out_dir = os.path.join(tempfile.gettempdir(), f"ray_lt_out_{uuid.uuid4().hex}")
    train_dir = store.train_dir()
    if "://" in train_dir:
        train_dir = os.path.join(tempfile.gettempdir(), "ray_lt_train")
    run = StageRun(
        spec=spec,
        objective=get_objective(spec.kind),
        data=load_dataset(spec.data, ctx.data_root),
        inputs=upstream(store, {n: up.key for n, up in spec.inputs}),
        out_dir=out_dir,
    )
    device = ctx.in_process or "cpu"  # in_trial stages: cheap by contract, no GPU needed
    session: Any = LocalSession(device, checkpoint_dir=os.path.join(train_dir, spec.key))
    if report_to_tune:
        session = TuneReportingSession(session)
    try:
        summary = run_stage(run, session)
        _raise_if_nonfinite(spec, summary)
        store.put(spec.key, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


class TuneReportingSession:
    """A ``LocalSession`` inside a Tune trial that also hands each epoch's metrics to Tune
    (without the checkpoint: the stage resumes from its own, under _train/<key>)."""

    def __init__(self, local: Any) -> None:
        self.local = local
        self.world_rank = local.world_rank
        self.world_size = local.world_size
        self.device = local.device

    def wrap_model(self, model: Any) -> Any:
        return self.local.wrap_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        self.local.report(metrics, checkpoint_dir)
        tune.report(dict(metrics))

    def last_checkpoint(self) -> dict[str, Any] | None:
        return self.local.last_checkpoint()


def stage_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker entry: load data and inputs, run the engine, publish from rank 0."""
    import ray

    from ray_lt.engine import RayTrainSession, StageRun, run_stage
    from ray_lt.objective import get_objective

    spec = StageSpec.from_dict(config["spec"])
    store = ArtifactStore(config["store"])
    inputs = ray.get(config["inputs_ref"])
    session = RayTrainSession()
    out_dir = None
    if session.world_rank == 0:
        out_dir = os.path.join(tempfile.gettempdir(), f"ray_lt_out_{uuid.uuid4().hex}")
    run = StageRun(
        spec=spec,
        objective=get_objective(spec.kind),
        data=ray.get(config["data_ref"]),
        inputs=inputs,
        out_dir=out_dir,
        fail_at_epoch=config.get("fail_at_epoch"),
        fault_marker=config.get("fault_marker"),
        fault_action=config.get("fault_action", "raise"),
    )
    try:
        summary = run_stage(run, session)
        if out_dir and summary["status"] == "ok":
            store.put(config["key"], out_dir)
    finally:
        if out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    summary["history"] = summary["history"][-1:]
    return summary
