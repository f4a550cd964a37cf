"""The sweep on a terminal: one view redrawn in place, a line per running trial.

On a terminal the driver shows, instead of a line per stage start and end, a view that ``rich``
redraws a few times a second: a heading with the counts of pending, running, finished and failed
trials, then one line per running trial (its short configuration and seed, its current stage as
``i/n name``, whether it trains or was reused, the epoch with images/s, the latest validation
metric and the stage's ETA). A trial that ends leaves one permanent line above the view, so the
terminal keeps a record of every trial once the view is gone; the closing summary follows.

The view is fed from two places on the driver, both thread-safe here: the trials' progress lines
(``console.progress``, routed by ``QuietConsole``), and Tune's trial statuses (``TrialCounts``, a
Tune callback). It only shows text: nothing a sweep computes depends on it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from ray.tune import Callback

from ray_lt.console import EPOCH_EVENT
from ray_lt.errors import ERROR_KEY

REFRESH_PER_S = 4
_CURRENT: LiveView | None = None  # the view of this driver's sweep, for ``TrialCounts``


def wanted(out: TextIO) -> bool:
    """A live view for a terminal (not for a pipe, a file, or ``TERM=dumb``)."""
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


@dataclass
class TrialRow:
    """What the view shows of one running trial."""

    label: str
    stage: str = ""  # "2/5 teacher_vanilla1"
    doing: str = "starting"  # starting, training, trained, reused
    epoch: str = ""  # "3/10"
    speed: str = ""  # "1234 img/s"
    metric: str = ""  # "val_overall=0.4120"
    eta_s: float | None = None

    def text(self) -> str:
        parts = [self.label, f"stage {self.stage} {self.doing}" if self.stage else self.doing]
        if self.epoch and self.doing == "training":
            parts.append(f"epoch {self.epoch}")
        if self.speed and self.doing == "training":
            parts.append(self.speed)
        if self.metric:
            parts.append(self.metric)
        if self.eta_s is not None and self.doing == "training":
            parts.append(f"ETA {_clock(self.eta_s)}")
        return " | ".join(parts)


class LiveView:
    """The view's state and its rendering; ``start`` / ``stop`` show it on ``out``.

    Args:
        name: the experiment's name, shown in the heading.
        total: how many trials the sweep runs (None when unknown).
        out: the terminal.
    """

    def __init__(self, name: str, total: int | None, out: TextIO | None = None) -> None:
        self.name = name
        self.total = total
        self.out = out or sys.stdout
        self.rows: dict[str, TrialRow] = {}
        self.counts = {"running": 0, "finished": 0, "failed": 0}
        self.ended: set[str] = set()
        self.since = time.monotonic()
        self.lock = threading.Lock()
        self.live: Any = None

    # -- input ---------------------------------------------------------------------------------

    def line(self, text: str) -> None:
        """A trial's progress line: ``<label> | stage i/n name | <event> | ...``."""
        parts = text.split(" | ")
        if len(parts) < 3 or not parts[1].startswith("stage "):
            self.print(text)  # not a stage line: keep it above the view
            return
        label, stage, event = parts[0], parts[1].removeprefix("stage "), parts[2]
        with self.lock:
            if label in self.ended:
                return  # a line that arrived after Tune saw the trial end
            row = self.rows.setdefault(label, TrialRow(label))
            row.stage = stage
            if event == "start":
                row.doing, row.epoch, row.speed, row.eta_s = "training", "", "", None
            elif event.startswith(EPOCH_EVENT):
                _epoch(row, parts)
            elif event.startswith(("trained", "reused")):
                row.doing = event.split()[0]
                row.metric = parts[3] if len(parts) > 3 else row.metric
                row.eta_s = None
        self.refresh()

    def statuses(self, trials: list[tuple[str, str, str]]) -> None:
        """Tune's view of the trials: (label, status, last metric shown) with status running,
        finished, failed or pending. A trial seen ending for the first time leaves a line."""
        counts = {"running": 0, "finished": 0, "failed": 0}
        newly_ended = []
        with self.lock:
            for label, status, shown in trials:
                if status in counts:
                    counts[status] += 1
                if status in ("finished", "failed") and label not in self.ended:
                    self.ended.add(label)
                    row = self.rows.pop(label, None)
                    newly_ended.append((label, status, row.metric if row else shown))
            self.counts = counts
        for label, status, metric in newly_ended:
            self.print(" | ".join(p for p in (f"{status}: {label}", metric) if p))
        self.refresh()

    # -- output --------------------------------------------------------------------------------

    def heading(self) -> str:
        c = self.counts
        total = self.total if self.total is not None else sum(c.values())
        pending = max(total - sum(c.values()), 0)
        return (
            f"ray-lt {self.name}: {c['running']} running · {pending} pending · "
            f"{c['finished']} finished · {c['failed']} failed · "
            f"{_clock(time.monotonic() - self.since)} elapsed"
        )

    def lines(self) -> list[str]:
        """The view as text: the heading, then a line per running trial."""
        with self.lock:
            rows = [r.text() for r in self.rows.values()]
        return [self.heading(), *(f"  {r}" for r in rows)]

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        return Group(*(Text(line, no_wrap=True, overflow="ellipsis") for line in self.lines()))

    def print(self, text: str) -> None:
        """A permanent line above the view (or plainly, when it is not shown)."""
        if self.live is not None:
            from rich.text import Text

            self.live.console.print(Text(text, no_wrap=True, overflow="ellipsis"))
        else:
            print(text, file=self.out, flush=True)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.refresh()

    def start(self) -> None:
        """Show the view; stderr writes and ``print`` here appear above it from now on."""
        global _CURRENT
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.out, highlight=False)
        self.live = Live(
            self,
            console=console,
            refresh_per_second=REFRESH_PER_S,
            redirect_stdout=False,  # Tune's prints go to the log file (QuietConsole)
            redirect_stderr=True,
        )
        self.live.start()
        _CURRENT = self

    def stop(self) -> None:
        """Draw the view one last time and leave it on the terminal."""
        global _CURRENT
        _CURRENT = None
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()


def current() -> LiveView | None:
    """The view shown by this driver now, if any."""
    return _CURRENT


def _epoch(row: TrialRow, parts: list[str]) -> None:
    """``| epoch 3/10 | 1234 img/s | 2.1 s | val_overall=0.41`` into the row."""
    row.doing = "training"
    row.epoch = parts[2].removeprefix(EPOCH_EVENT)
    row.speed = parts[3] if len(parts) > 3 else ""
    if len(parts) > 5 and parts[5]:
        row.metric = parts[5]
    try:
        done, epochs = (int(x) for x in row.epoch.split("/"))
        row.eta_s = (epochs - done) * float(parts[4].removesuffix(" s"))
    except (ValueError, IndexError):
        row.eta_s = None


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
    )


class TrialCounts(Callback):
    """A Tune callback that hands the trials' statuses to the view shown (if any).

    ``label_of(config)`` is a trial's console label from its Tune config; ``metric`` the one
    shown on a trial's closing line when its last stage line has not arrived. It holds no
    view itself (Tune keeps its callbacks with the experiment's state for ``--resume``): it
    finds the driver's current one.
    """

    def __init__(self, label_of: Callable[[dict[str, Any]], str], metric: str) -> None:
        self.label_of = label_of
        self.metric = metric
        self.last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._update(trials, every_s=0.5)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._update(trials, every_s=0.0)

    def _update(self, trials: list, every_s: float) -> None:
        view = current()
        if view is None or time.monotonic() - self.last < every_s:
            return
        self.last = time.monotonic()
        view.statuses(
            [(self.label_of(t.config), _status(t), self._shown(t.last_result)) for t in trials]
        )

    def _shown(self, result: dict[str, Any] | None) -> str:
        value = (result or {}).get(self.metric)
        return f"{self.metric}={value:.4f}" if isinstance(value, float) else ""


def _status(trial: Any) -> str:
    """Tune's status of a trial in the view's words; a trial that reported ray-lt's error
    ended (TERMINATED) but failed."""
    if trial.status == "RUNNING":
        return "running"
    if trial.status == "ERROR" or (
        trial.status == "TERMINATED" and ERROR_KEY in (trial.last_result or {})
    ):
        return "failed"
    return "finished" if trial.status == "TERMINATED" else "pending"
