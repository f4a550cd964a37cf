"""A trial: walk a stage DAG in dependency order, reusing or training each stage.

A stage the store holds is reused. The others are trained under their key's lock (a second
trial needing the same stage waits, then reuses): cheap ones in this process, the rest in Ray
Train worker groups, as many consecutive stages per group as the locks allow
(``ray_lt.worker_group``: one worker-group start per trial, not per stage). Each stage is then
mirrored to MLflow. The dataset travels to the workers through the Ray object store (put once by
the sweep driver), upstream weights through the store by key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ray_lt.artifacts import Artifact, ArtifactStore
from ray_lt.errors import RayLtError
from ray_lt.spec import StageSpec, walk
from ray_lt.worker_group import raise_if_nonfinite, upstream

# "1": a worker group per stage, as before batches (a baseline for bench/sweep_overhead.py, and a
# way to give each stage a fresh set of processes)
ONE_GROUP_PER_STAGE_ENV = "RAY_LT_ONE_GROUP_PER_STAGE"

__all__ = ["StageOutcome", "TrialContext", "ensure_stage", "run_pipeline", "upstream"]


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
    stage_seconds: dict[str, float] = field(default_factory=dict)  # key -> training's length


@dataclass
class StageOutcome:
    spec: StageSpec
    artifact: Artifact
    reused: bool


def run_pipeline(final: StageSpec, ctx: TrialContext) -> list[StageOutcome]:
    """Every stage of ``final``'s DAG, dependencies first; the last outcome is ``final``'s.

    Each step reuses what the store holds, then trains: a stage that runs in this process (one
    at a time, as before), or else a *batch*, every stage whose inputs are ready or in the batch
    and whose lock is free, in one worker group. Stages another trial is training are left out
    of the batch (their dependants too) and waited for only when nothing else can train.
    """
    store = ArtifactStore(ctx.store_uri)
    stages = walk(final)
    done: dict[str, StageOutcome] = {}
    while len(done) < len(stages):
        _reuse_stored(stages, store, done, ctx, final.key)
        ready = [s for s in stages if s.key not in done and _inputs_done(s, done)]
        if len(done) == len(stages):
            break
        if not ready:
            raise RayLtError(f"stage DAG of {final.name} has a cycle")  # walk() forbids it
        local = [s for s in ready if _runs_here(s, ctx)]
        if local:
            _record(
                done,
                ensure_stage(local[0], store, ctx, is_final=local[0].key == final.key),
                ctx,
                final.key,
            )
            continue
        batch, locks = _lock_batch(stages, done, store, ctx)
        if not batch:  # every ready stage is another trial's to train: wait for the first
            _wait_for(ready[0], store, ctx)
            continue
        try:
            _train_batch(batch, store, ctx, final.key, done)
        finally:
            for lock in locks:
                lock.release()
    return [done[s.key] for s in stages]


def _inputs_done(spec: StageSpec, done: dict[str, StageOutcome]) -> bool:
    return all(up.key in done for _, up in spec.inputs)


def _runs_here(spec: StageSpec, ctx: TrialContext) -> bool:
    return bool(ctx.in_process) or spec.resources.inline or _in_trial(spec)


def _record(
    done: dict[str, StageOutcome], outcome: StageOutcome, ctx: TrialContext, final_key: str
) -> None:
    done[outcome.spec.key] = outcome
    if ctx.mirror is not None:
        ctx.mirror.log_stage(
            outcome.artifact, reused=outcome.reused, final=outcome.spec.key == final_key
        )


def _reuse_stored(
    stages: list[StageSpec],
    store: ArtifactStore,
    done: dict[str, StageOutcome],
    ctx: TrialContext,
    final_key: str,
) -> None:
    """Record, dependencies first, every stage the store already holds."""
    for spec in stages:
        if spec.key not in done and _inputs_done(spec, done):
            found = store.lookup(spec.key)
            if found is not None:
                _record(done, StageOutcome(spec, found, reused=True), ctx, final_key)


def _lock_batch(
    stages: list[StageSpec], done: dict[str, StageOutcome], store: ArtifactStore, ctx: TrialContext
) -> tuple[list[StageSpec], list[Any]]:
    """The stages one worker group can train now: ready or fed by the batch, with the first
    one's resources, and a lock taken without waiting (a held lock leaves the stage out)."""
    batch: list[StageSpec] = []
    locks = []
    for spec in stages:
        if spec.key in done or _runs_here(spec, ctx):
            continue
        if batch and spec.resources != batch[0].resources:
            continue  # another worker group's (a different worker count or GPU need)
        inside = {s.key for s in batch}
        if not all(up.key in done or up.key in inside for _, up in spec.inputs):
            continue
        lock = store.lock(spec.key, ctx.owner)
        try:
            taken = lock.acquire(timeout_s=0, should_stop=lambda k=spec.key: store.contains(k))
        except BaseException:
            for held in locks:  # a failing store must not leave this batch's locks behind
                held.release()
            raise
        if taken:
            batch.append(spec)
            locks.append(lock)
            if os.environ.get(ONE_GROUP_PER_STAGE_ENV) == "1":
                break
    return batch, locks


def _wait_for(spec: StageSpec, store: ArtifactStore, ctx: TrialContext) -> None:
    """Wait, holding no worker group, until another trial has trained ``spec`` or let it go."""
    lock = store.lock(spec.key, ctx.owner)
    if lock.acquire(should_stop=lambda: store.contains(spec.key)):
        lock.release()  # free but not stored (its trainer failed): the next step trains it


def _train_batch(
    batch: list[StageSpec],
    store: ArtifactStore,
    ctx: TrialContext,
    final_key: str,
    done: dict[str, StageOutcome],
) -> None:
    """Train the batch in one worker group, then record each stage it published."""
    from ray_lt.worker_group import train_batch

    watch = getattr(ctx.mirror, "worker_progress", None)
    summaries = train_batch(
        batch,
        store,
        ctx.data_refs,
        final_key=final_key if ctx.report_to_tune else None,
        progress=watch(batch) if watch else None,
        metric=getattr(ctx.mirror, "metric", "val_overall"),
        data_root=ctx.data_root,
    )
    ctx.stage_seconds.update({s["key"]: s["seconds"] for s in summaries if "seconds" in s})
    for spec in batch:
        artifact = store.lookup(spec.key)
        if artifact is None:
            raise RayLtError(f"stage {spec.name} ({spec.key}) finished but left no valid artifact")
        _record(done, StageOutcome(spec, artifact, reused=False), ctx, final_key)


def ensure_stage(
    spec: StageSpec, store: ArtifactStore, ctx: TrialContext, *, is_final: bool
) -> StageOutcome:
    """Reuse the stored artifact of ``spec`` or train it in this process, never twice at once."""
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
        starting = getattr(ctx.mirror, "starting", None)
        if starting is not None:
            starting(spec)
        started = time.monotonic()
        train_stage_in_process(spec, store, ctx, report_to_tune=ctx.report_to_tune and is_final)
        ctx.stage_seconds[key] = time.monotonic() - started
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


def train_stage_in_process(
    spec: StageSpec, store: ArtifactStore, ctx: TrialContext, *, report_to_tune: bool = False
) -> None:
    """The same engine and objective in this process (no Ray): checkpoints under _train/<key>,
    removed once the stage is published.

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
    checkpoint_dir = os.path.join(train_dir, spec.key)
    session: Any = LocalSession(device, checkpoint_dir=checkpoint_dir)
    if report_to_tune:
        session = TuneReportingSession(session, spec.train.epochs)
    echo = getattr(ctx.mirror, "epoch_echo", None)
    if echo is not None:
        session = echo(session, spec)
    try:
        summary = run_stage(run, session)
        raise_if_nonfinite(spec, summary)
        store.put(spec.key, out_dir)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # published: the resume state is dead
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


class TuneReportingSession:
    """A ``LocalSession`` inside a Tune trial that also hands each epoch's metrics but the last
    to Tune (``engine.sessions.to_scheduler``), without the checkpoint: the stage resumes from
    its own, under _train/<key>."""

    def __init__(self, local: Any, epochs: int) -> None:
        self.local = local
        self.epochs = epochs
        self.world_rank = local.world_rank
        self.world_size = local.world_size
        self.device = local.device

    def wrap_model(self, model: Any) -> Any:
        return self.local.wrap_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        from ray_lt.engine.sessions import to_scheduler

        self.local.report(metrics, checkpoint_dir)
        if to_scheduler(metrics, self.epochs):
            tune.report(dict(metrics))

    def last_checkpoint(self) -> dict[str, Any] | None:
        return self.local.last_checkpoint()
