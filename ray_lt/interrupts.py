"""Ctrl-C and SIGTERM during a sweep: stop within seconds, lose nothing, say how to resume.

The first signal asks Tune to end the run the way it ends one itself: it saves the experiment
state one last time and stops the running trials (Tune listens for SIGUSR1 for this; its own
SIGINT handler is switched off so that the sweep, not Tune, decides what a Ctrl-C prints). A
second signal stops at once. Either way the driver then shuts Ray down, which ends every trial
process, releases the stage locks those processes held, marks their MLflow runs KILLED, and
prints one line with the exact ``--resume`` command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130  # the shell's convention for a program ended by SIGINT


class SweepInterrupted(BaseException):
    """Raised in the driver's main thread by a second signal (or one outside Tune's run)."""


class Interrupts:
    """The driver's SIGINT/SIGTERM handling for the duration of a sweep."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self.started_at = time.time()
        self._tune_running = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Handle SIGINT and SIGTERM in this block; the previous handlers come back after it."""
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        self.reinstall()
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def reinstall(self) -> None:
        """Take the signals (back): ``ray.init`` installs Ray's own native SIGTERM handler,
        which logs a stack trace and aborts the driver; call this right after it."""
        for s in SIGNALS:
            signal.signal(s, self._handle)

    @contextlib.contextmanager
    def tune_running(self) -> Iterator[None]:
        """Mark the block in which Tune's run loop may take a first signal gracefully."""
        self._tune_running = True
        try:
            yield
        finally:
            self._tune_running = False

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signal.Signals(signum).name
            print(
                f"ray-lt: {self.received} received; stopping the trials (again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        if first and self._tune_running and _tune_listens():
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise SweepInterrupted(self.received)


def _tune_listens() -> bool:
    """True once Tune's run loop has installed its SIGUSR1 handler (before that, SIGUSR1's
    default action would end the process)."""
    if not hasattr(signal, "SIGUSR1"):
        return False
    return signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this sweep."""
    args = [a for a in argv if a != "--resume"]
    return shlex.join(["python", "-m", "ray_lt.sweep", *args, "--resume"])


class _TuneInterruptLines(logging.Filter):
    """Drops Tune's own interrupt lines: they suggest ``Tuner.restore(...)`` where a user of the
    sweep types ``--resume``, which the sweep prints instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Stop signal received" in text or "Tuner.restore(" in text)


def quiet_tune_interrupt_lines() -> None:
    """Install the filter on Tune's logger (once)."""
    logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _TuneInterruptLines) for f in logger.filters):
        logger.addFilter(_TuneInterruptLines())


def after_interrupt(
    experiment: str, store: Any, tracking_uri: str, interrupts: Interrupts, argv: list[str]
) -> int:
    """Once Ray is down: free what the ended trials held, then one line and exit 130."""
    from ray_lt.locks import release_dead_locks

    freed = release_dead_locks(store)
    finished, killed = _close_runs(tracking_uri, experiment, interrupts.started_at)
    notes = [f"{finished} trial(s) finished"]
    if killed:
        notes.append(f"{killed} unfinished trial run(s) marked KILLED in MLflow")
    if freed:
        notes.append(f"{len(freed)} stage lock(s) released")
    print(
        f"ray-lt: interrupted ({interrupts.received}): {', '.join(notes)}; resume with: "
        f"{resume_command(argv)}",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _close_runs(tracking_uri: str, experiment: str, since: float) -> tuple[int, int]:
    """(trial runs finished, trial runs still RUNNING now marked KILLED) since ``since``."""
    from ray_lt.tracking import Tracker

    try:
        tracker = Tracker(tracking_uri, experiment)
        since_ms = int(since * 1000)
        killed = tracker.close_unfinished(None, started_after_ms=since_ms)
        return len(tracker.trial_runs("FINISHED", since_ms)), killed
    except Exception as err:  # noqa: BLE001 - MLflow is a mirror; the store kept everything
        text = " ".join(str(err).split())[:200]
        print(f"warning: could not update MLflow after the interrupt: {text}", file=sys.stderr)
        return 0, 0
