"""``run_stage``: the loop over epochs, as named phases over a small ``LoopState``."""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ray_lt.engine.epoch import lr_at, train_epoch
from ray_lt.engine.evaluation import SplitOutputs, eval_metrics, evaluate_splits
from ray_lt.engine.export import export
from ray_lt.engine.prepare import PreparedStage, StageRun, prepare, selects_best
from ray_lt.engine.sessions import STATE_FILE, Session
from ray_lt.errors import ConfigError
from ray_lt.spec import TrainSpec

KILL_DELAY_S = 3.0  # an injected kill waits this long into its epoch, as a crash mid-epoch would


@dataclass
class Best:
    """The best epoch so far by ``select_metric`` (model selection), with its weights."""

    score: float = -math.inf
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None  # on the CPU; None: nothing selected yet


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch; a checkpoint restores the first three."""

    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    last_eval: dict[str, float] = field(default_factory=dict)  # reported until the next one
    outputs: dict[str, SplitOutputs] | None = None  # the latest evaluation's (rank 0)
    last: bool = False  # the latest epoch trained was the stage's last
    status: str = "ok"  # or "nonfinite"


def run_stage(run: StageRun, session: Session) -> dict[str, Any]:
    """Train one stage to the end (or to a non-finite loss) and export it from rank 0.

    Returns a summary: ``status`` ("ok" or "nonfinite"), ``start_epoch`` (0, or the epoch a
    checkpoint resumed at), the history, the final test metrics and, on rank 0, ``out_dir``.
    With ``select="best"`` (or ``patience``) the exported model is the best epoch's by
    ``select_metric``, and training stops after ``patience`` epochs without a gain.
    """
    stage = prepare(run, session)
    state = restore(stage, session.last_checkpoint())
    wrapped = session.wrap_model(stage.model)
    for epoch in range(state.start_epoch, stage.train.epochs):
        if patience_ran_out(stage.train, state.best, epoch):
            break  # resumed after the patience ran out
        inject_fault(run, epoch)
        tic = time.perf_counter()
        epoch_loss, images = train_epoch(stage, wrapped, epoch)
        seconds = time.perf_counter() - tic
        if not math.isfinite(epoch_loss["loss"]):
            state.status = "nonfinite"
            state.history.append({"epoch": epoch + 1, **epoch_loss, "status": state.status})
            break
        state.last = epoch + 1 == stage.train.epochs
        evaluate_epoch(stage, state, epoch)
        stop = select_best(stage, state, epoch)
        metrics = epoch_metrics(stage, state, epoch, epoch_loss, seconds, images)
        state.history.append(metrics)
        checkpoint(stage, state, session, metrics)
        if stop:
            break
    return finish(stage, state)


def restore(stage: PreparedStage, saved: dict[str, Any] | None) -> LoopState:
    """The loop's state from the last checkpoint (model and optimiser loaded), or a fresh one."""
    state = LoopState()
    if saved is None:
        return state
    stage.model.load_state_dict(saved["model"])
    stage.optimizer.load_state_dict(saved["optimizer"])
    state.start_epoch = int(saved["epoch"])
    state.history = json.loads(saved["history"])
    if "best_state" in saved:
        score, epoch = float(saved["best_score"]), int(saved["best_epoch"])
        state.best = Best(score, epoch, saved["best_state"])
    return state


def patience_ran_out(train: TrainSpec, best: Best, epoch: int) -> bool:
    return bool(train.patience and epoch - best.epoch >= train.patience and best.epoch)


def inject_fault(run: StageRun, epoch: int) -> None:
    """Tests' fault injection: fail once at ``run.fail_at_epoch``, recorded in its marker file,
    by raising or (``fault_action="kill"``) by a real process death, as an OOM kill would."""
    marker = run.fault_marker
    if run.fail_at_epoch != epoch or not marker or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"injected at epoch {epoch}\n")
    if run.fault_action == "kill":
        # partway into the epoch: the checkpoints already reported have had time to be
        # registered by Ray Train's controller (tiny test epochs last 0.2 s)
        time.sleep(KILL_DELAY_S)
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at epoch {epoch} (RAY_LT_INJECT_FAULT)")


def evaluate_epoch(stage: PreparedStage, state: LoopState, epoch: int) -> None:
    """Rank 0 evaluates every ``eval_every`` epochs and after the last; the metrics of the
    latest evaluation are reported with every epoch until the next one."""
    if stage.rank != 0 or not (state.last or (epoch + 1) % stage.eval_every == 0):
        return
    state.outputs = _evaluate(stage)
    state.last_eval = eval_metrics(state.outputs, stage.data)


def select_best(stage: PreparedStage, state: LoopState, epoch: int) -> bool:
    """Keep the best epoch's weights (rank 0 decides); True when the patience says stop, on
    every rank together."""
    train = stage.train
    if not selects_best(train):
        return False
    stop = False
    if stage.rank == 0:
        score = _score(state.last_eval, train)
        if score > state.best.score:
            state.best = Best(score, epoch + 1, _cpu_state(stage.model))
        stop = bool(train.patience) and epoch + 1 - state.best.epoch >= train.patience
    if stage.world > 1:
        flag = torch.tensor([float(stop)], device=stage.device)
        torch.distributed.broadcast(flag, src=0)
        stop = bool(flag.item())
    return stop


def epoch_metrics(
    stage: PreparedStage,
    state: LoopState,
    epoch: int,
    epoch_loss: dict[str, float],
    seconds: float,
    images: int,
) -> dict[str, Any]:
    """The epoch's report: progress, learning rate, losses, speed and the latest evaluation."""
    train = stage.train
    metrics = {
        "epoch": epoch + 1,
        "progress": stage.run.progress_offset + epoch + 1,
        "lr": lr_at(train, epoch + 1 - 1e-9),
        **epoch_loss,
        "epoch_s": seconds,
        "images_per_s": images * stage.world / max(seconds, 1e-9),
        **state.last_eval,
    }
    if selects_best(train):
        metrics["best_epoch"] = state.best.epoch
    return metrics


def checkpoint(stage: PreparedStage, state: LoopState, session: Session, metrics: dict) -> None:
    """Report the epoch; rank 0 attaches the checkpoint a rerun resumes from."""
    with tempfile.TemporaryDirectory() as tmp:
        if stage.rank == 0:
            saved = {
                "model": stage.model.state_dict(),
                "optimizer": stage.optimizer.state_dict(),
                "epoch": metrics["epoch"],
                "history": json.dumps(state.history),
            }
            if state.best.state is not None:
                saved.update(
                    best_state=state.best.state,
                    best_score=torch.tensor(state.best.score, dtype=torch.float64),
                    best_epoch=state.best.epoch,
                )
            torch.save(saved, Path(tmp) / STATE_FILE)
        session.report(metrics, tmp if stage.rank == 0 else None)


def finish(stage: PreparedStage, state: LoopState) -> dict[str, Any]:
    """The summary; rank 0 exports the selected (else the last) epoch's model when all went
    well, evaluating it again unless the last epoch's evaluation is the one to export."""
    summary: dict[str, Any] = {
        "status": state.status,
        "start_epoch": state.start_epoch,
        "history": state.history,
    }
    out_dir = stage.run.out_dir
    if state.status != "ok" or stage.rank != 0 or not out_dir:
        return summary
    outputs = state.outputs if state.last else None
    if state.best.state is not None:  # export the selected epoch, not the last one
        stage.model.load_state_dict(state.best.state)
        outputs = None
    if outputs is None:
        outputs = _evaluate(stage)
    exported = export(
        out_dir,
        stage.objective,
        stage.model,
        outputs,
        stage.ctx,
        history=state.history,
        start_epoch=state.start_epoch,
        selected_epoch=state.best.epoch,
    )
    return {**summary, **exported, "out_dir": out_dir}


def _evaluate(stage: PreparedStage) -> dict[str, SplitOutputs]:
    return evaluate_splits(
        stage.objective, stage.model, stage.eval_sources, stage.data, stage.train, stage.device
    )


def _score(metrics: dict[str, float], train: TrainSpec) -> float:
    value = metrics.get(train.select_metric)
    if value is None or not math.isfinite(value):
        raise ConfigError(
            f"model selection needs '{train.select_metric}' every epoch, got {value!r} (known: "
            f"{sorted(metrics)}); set select_metric to one of them, or select='last', patience=0"
        )
    return float(value)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
