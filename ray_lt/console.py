"""What a user watching a sweep sees: a line per stage and the summary, Ray's output in a file.

Left alone, Ray streams every worker's output to the driver (Train's checkpoint and report lines,
controller messages, tracebacks of retried attempts) and Tune redraws status tables: hundreds of
lines for a two-trial smoke sweep, in which the lines that matter (which stage is training, what
it scored) are hard to find. By default the driver here keeps the console for:

- one line as a stage starts and one as it ends (``StageProgress``, printed in the trial with
  ``PROGRESS_MARK``, which the driver recognises and prints without Ray's prefix);
- ray-lt's own lines (errors, warnings, the closing summary), printed by the driver itself;

and sends everything else, worker output and the driver's Ray, Tune, Optuna and MLflow log
records, to one log file whose path it prints once. ``--verbose`` keeps Ray's console output.

This module must not change what a sweep computes or the exit codes; it only routes text.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from ray_lt.spec import StageSpec

PROGRESS_MARK = "[ray-lt] "
# Driver-side loggers whose records go to the log file instead of the console.
QUIET_LOGGERS = ("ray", "optuna", "mlflow")
# Ray Train (V2) starts a ``PreemptionWatcher`` actor for every worker group with
# ``max_restarts=-1`` and the worker actors' handles as constructor arguments; Ray Core logs at
# error level, once per controller process and so once per stage, that such an actor could not
# be restarted if those arguments were lost. The watcher is Ray's, not ours, it only observes
# node drains, and the stage runs correctly, so the line is dropped from the console (the log
# file keeps it). Switching the watcher off (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0) would remove
# the line at its source but also Train's reaction to a node being drained (a reclaimed spot
# instance), which is why it stays on.
FALSE_ALARMS = ("Actor with class name: 'PreemptionWatcher'",)


# -- in the trial --------------------------------------------------------------------------------


def progress(text: str) -> None:
    """Print one progress line from a trial or a stage's worker; the driver shows it on the
    console. Written to stdout itself: in its workers Ray Train turns ``print`` into a log
    record, which never reaches the driver."""
    sys.stdout.write(f"{PROGRESS_MARK}{text}\n")
    sys.stdout.flush()


EPOCH_EVENT = "epoch "  # the third field of an epoch's progress line (terminal view only)


class EpochEcho:
    """A session that also prints one progress line per epoch (rank 0): the terminal's live
    view shows the epoch, its speed and the latest validation metric; the line-per-stage
    console leaves these lines out. Everything else is the wrapped session's."""

    def __init__(self, session: Any, prefix: str, epochs: int, metric: str) -> None:
        self.session = session
        self.prefix = prefix
        self.epochs = epochs
        self.metric = metric

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.session.report(metrics, checkpoint_dir)
        if self.session.world_rank == 0:
            progress(epoch_line(self.prefix, metrics, self.epochs, self.metric))


def epoch_line(prefix: str, metrics: dict[str, Any], epochs: int, metric: str) -> str:
    """``<prefix> | epoch 3/10 | 1234 img/s | 2.1 s | val_overall=0.4120``."""
    value = metrics.get(metric)
    shown = f"{metric}={value:.4f}" if isinstance(value, float) else ""
    return (
        f"{prefix} | {EPOCH_EVENT}{int(metrics.get('epoch', 0))}/{epochs} | "
        f"{float(metrics.get('images_per_s', 0.0)):.0f} img/s | "
        f"{float(metrics.get('epoch_s', 0.0)):.1f} s | {shown}"
    )


def is_epoch_line(text: str) -> bool:
    parts = text.split(" | ")
    return len(parts) > 2 and parts[2].startswith(EPOCH_EVENT)


class StageProgress:
    """Stands in for the trial's mirror in ``pipeline.run_pipeline``: it mirrors each stage as
    it ends and prints a start and an end line per stage trained (an end line for one reused).
    A stage trained in this process gets its start line from ``starting``; stages trained in a
    worker group get theirs from rank 0 there, at the time they happen (``worker_progress``
    hands it the prefixes).

    Args:
        mirror: the trial's ``TrialMirror`` (or None).
        label: the trial's short configuration and seed.
        stages: the trial's DAG, dependencies first (the order the pipeline runs it).
        metric: the metric shown for a finished stage (``val_overall`` style names are read
            from the artifact's validation metrics).
    """

    def __init__(
        self,
        mirror: Any,
        label: str,
        stages: list[StageSpec],
        metric: str,
    ) -> None:
        self.mirror = mirror
        self.label = label
        self.positions = {s.key: (i, s.name) for i, s in enumerate(stages)}
        self.count = len(stages)
        self.metric = metric
        self.since = time.monotonic()
        self.in_workers: set[str] = set()

    def begin(self) -> None:
        """The trial starts: a reused stage's end line counts from here."""
        self.since = time.monotonic()

    def starting(self, spec: StageSpec) -> None:
        """The start line of a stage about to train in this process."""
        self.since = time.monotonic()
        progress(f"{self._where(spec.key)} | start")

    def worker_progress(self, batch: list[StageSpec]) -> dict[str, str]:
        """The line prefix of each stage a worker group is about to train (it prints them)."""
        self.in_workers.update(s.key for s in batch)
        return {s.key: self._where(s.key) for s in batch}

    def epoch_echo(self, session: Any, spec: StageSpec) -> Any:
        """``session``, also printing a line per epoch of ``spec`` (trained in this process)."""
        return EpochEcho(session, self._where(spec.key), spec.train.epochs, self.metric)

    def log_stage(self, artifact: Any, *, reused: bool, final: bool) -> None:
        """Mirror the stage that just ended and print its end line (unless a worker did)."""
        if self.mirror is not None:
            self.mirror.log_stage(artifact, reused=reused, final=final)
        if artifact.key not in self.in_workers:
            seconds = time.monotonic() - self.since
            what = "reused" if reused else "trained"
            progress(
                f"{self._where(artifact.key)} | {what} in {seconds:.1f}s | "
                f"{val_metric(artifact, self.metric)}"
            )
        self.since = time.monotonic()

    def _where(self, key: str) -> str:
        index, name = self.positions[key]
        return f"{self.label} | stage {index + 1}/{self.count} {name}"


def trial_label(config: dict[str, Any]) -> str:
    """A trial on one line: its short configuration, then its seed."""
    rest = {k: v for k, v in config.items() if k != "seed"}
    return f"{short_config(rest, width=60)} seed={config.get('seed')}"


def short_config(config: dict[str, Any], width: int = 100) -> str:
    """A trial's configuration on one line: floats to 4 significant digits, nested dicts
    flattened, cut at ``width`` characters."""
    parts = [f"{k}={_short_value(v)}" for k, v in config.items() if not k.startswith("__")]
    text = " ".join(parts) or "(no parameters)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + " ".join(f"{k}={_short_value(v)}" for k, v in value.items()) + "}"
    return str(value) if value != "" else "''"


def val_metric(artifact: Any, metric: str) -> str:
    """``val_overall=0.5070`` from a stage's artifact: the sweep's metric where it is a
    validation metric, else the validation ``overall``."""
    try:
        val = artifact.metrics().get("val", {})
    except Exception as err:  # noqa: BLE001 - a progress line must never fail a trial
        return f"metrics unreadable ({type(err).__name__})"
    name = metric[4:] if metric.startswith("val_") and metric[4:] in val else "overall"
    value = val.get(name)
    shown = f"{value:.4f}" if isinstance(value, float) else value
    return f"val_{name}={shown}"


# -- on the driver -------------------------------------------------------------------------------


def log_path(store_uri: str, name: str) -> str:
    """Where Ray's output goes: the Tune run's folder in a local store, else a local folder
    (a remote store is written through pyarrow, a log file is appended line by line)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    if "://" in store_uri:
        folder = os.path.join(os.path.abspath("ray_lt_logs"), name)
    else:
        folder = os.path.join(store_uri, "_tune", name)
    return os.path.join(folder, f"console-{stamp}.log")


class QuietConsole:
    """Routes Ray's output to a log file for the duration of a sweep (``open`` / ``close``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: TextIO | None = None
        self.out: TextIO = sys.stdout  # the console, also while Tune's prints are redirected
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self.view: Any = None  # a ``live_view.LiveView`` on a terminal, set by the driver

    def open(self) -> None:
        """Before ``ray.init``: the driver's log records go to the file from here on."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.out = sys.stdout
        _configure_optuna_logger()  # else Optuna adds its console handler on first use
        handler = logging.StreamHandler(self.file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in QUIET_LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, list(logger.handlers), logger.propagate))
            logger.handlers = [handler]
            logger.propagate = False
        print(f"ray-lt: Ray's own output (workers, Tune) goes to {self.path}", flush=True)

    def route_workers(self) -> None:
        """After ``ray.init``: worker output goes to the file, progress lines to the console."""
        route_worker_output(self._worker_lines)

    def _worker_lines(self, data: dict[str, Any]) -> None:
        if data.get("pid") == "autoscaler":
            # Ray publishes the autoscaler's status table every few seconds to every driver;
            # its own printer shows only autoscaler events. ``ray status`` shows the table.
            return
        name = data.get("actor_name") or data.get("task_name") or "worker"
        who = f"({name} pid={data.get('pid')})"
        for line in data.get("lines", []):
            if PROGRESS_MARK in line:
                self.show(line.split(PROGRESS_MARK, 1)[1])
            elif self.file is not None:
                self.file.write(f"{who} {line}\n")

    def show(self, text: str) -> None:
        """A trial's progress line: on the live view when there is one, else printed (a line
        per stage start and end; epoch lines only in the log file)."""
        if self.view is not None:
            self.view.line(text)
        elif not is_epoch_line(text):
            print(text, file=self.out, flush=True)
        elif self.file is not None:
            self.file.write(f"{text}\n")

    @contextlib.contextmanager
    def tune_prints(self) -> Iterator[None]:
        """Send what Tune prints on the driver (its experiment heading, which it prints at
        every verbosity) to the file, for the duration of ``Tuner.fit``."""
        if self.file is None:
            yield
            return
        with contextlib.redirect_stdout(self.file):
            yield

    def close(self) -> None:
        """Give the loggers their handlers back and close the file."""
        for logger, handlers, propagate in self._saved:
            logger.handlers = handlers
            logger.propagate = propagate
        self._saved = []
        if self.file is not None:
            self.file.close()
            self.file = None


def _configure_optuna_logger() -> None:
    """Let Optuna set up its logger now, so that ``QuietConsole`` can replace its handler."""
    try:
        import optuna
    except ImportError:  # Optuna sweeps need it; grid and random ones do not
        return
    optuna.logging.get_logger("optuna")


def route_worker_output(handler: Callable[[dict[str, Any]], None] | None) -> None:
    """Replace Ray's printer of worker output on this driver by ``handler``, or (None) wrap it
    so that it drops ``FALSE_ALARMS``.

    Ray has no public hook for this: ``ray.init(log_to_driver=False)`` would drop the trials'
    progress lines with the rest, so the driver's stream dispatcher (private in this Ray) is
    used. Where it is missing, Ray's own printing stays as it is.
    """
    from ray._private import ray_logging

    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    handlers = dict(getattr(dispatcher, "handlers", []))
    printer = handlers.get("ray_print_logs")
    if dispatcher is None or printer is None:
        return
    dispatcher.remove_handler("ray_print_logs")
    if handler is None:
        dispatcher.add_handler("ray_print_logs", lambda data: _without_false_alarms(data, printer))
    else:
        dispatcher.add_handler("ray_print_logs", handler)


def _without_false_alarms(data: dict[str, Any], printer: Callable[[dict[str, Any]], None]) -> None:
    lines = [ln for ln in data.get("lines", []) if not any(a in ln for a in FALSE_ALARMS)]
    if lines:
        printer({**data, "lines": lines})
