"""The live view a user sees on a terminal, and the epoch lines that feed it.

Unit tests drive the view with the progress lines the trials really print (``StageProgress``,
``EpochEcho`` on a real ``LocalSession``); the end-to-end tests run the quickstart smoke sweep and
a bad command on a real pseudo-terminal (``tests/terminal.py``) with a real local Ray, store and
MLflow.
"""

from __future__ import annotations

import io
import os
import pty
import re
from pathlib import Path

import pytest

from ray_lt.artifacts import ArtifactStore
from ray_lt.console import PROGRESS_MARK, EpochEcho, QuietConsole, StageProgress, is_epoch_line
from ray_lt.engine import LocalSession
from ray_lt.live_view import LiveView, wanted
from tests.cli import sweep_cmd
from tests.conftest import tiny_ce, tiny_crt
from tests.terminal import run_on_terminal

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "experiments" / "quickstart.py"
LABEL = "lr=0.1 seed=0"


def _epoch_lines(capsys) -> list[str]:
    return [ln.removeprefix(PROGRESS_MARK) for ln in capsys.readouterr().out.splitlines()]


def test_epoch_echo_reports_then_prints_a_line_per_epoch(capsys):
    local = LocalSession("cpu")
    echo = EpochEcho(local, f"{LABEL} | stage 1/2 ce", epochs=4, metric="val_overall")
    assert echo.world_rank == 0 and echo.device == local.device  # the session's, unchanged
    echo.report({"epoch": 1, "images_per_s": 1234.4, "epoch_s": 2.04}, None)
    echo.report({"epoch": 2, "images_per_s": 1200.0, "epoch_s": 2.0, "val_overall": 0.41}, None)
    assert [r["epoch"] for r in local.reports] == [1, 2]
    lines = _epoch_lines(capsys)
    assert lines == [
        f"{LABEL} | stage 1/2 ce | epoch 1/4 | 1234 img/s | 2.0 s | ",
        f"{LABEL} | stage 1/2 ce | epoch 2/4 | 1200 img/s | 2.0 s | val_overall=0.4100",
    ]
    assert all(is_epoch_line(ln) for ln in lines)
    assert not is_epoch_line(f"{LABEL} | stage 1/2 ce | start")


def test_stage_progress_echoes_the_epochs_of_a_stage_it_trains(capsys):
    ce = tiny_ce()
    watch = StageProgress(None, LABEL, [ce, tiny_crt(ce)], "val_overall")
    echo = watch.epoch_echo(LocalSession("cpu"), ce)
    echo.report({"epoch": 1, "images_per_s": 10.0, "epoch_s": 1.0}, None)
    assert _epoch_lines(capsys) == [
        f"{LABEL} | stage 1/2 ce | epoch 1/{ce.train.epochs} | 10 img/s | 1.0 s | "
    ]


def test_the_view_follows_a_trial_through_its_stages():
    out = io.StringIO()
    view = LiveView("quickstart", total=3, out=out)
    assert view.lines() == [
        "ray-lt quickstart: 0 running · 3 pending · 0 finished · 0 failed · 0:00 elapsed"
    ]
    view.statuses([(LABEL, "running", ""), ("lr=0.2 seed=0", "pending", "")])
    view.line(f"{LABEL} | stage 1/2 ce | reused in 0.1s | val_overall=0.2500")
    view.line(f"{LABEL} | stage 2/2 crt | start")
    view.line(f"{LABEL} | stage 2/2 crt | epoch 1/4 | 1234 img/s | 2.5 s | val_overall=0.4100")
    assert view.lines()[0].startswith("ray-lt quickstart: 1 running · 2 pending · 0 finished")
    assert view.lines()[1] == (
        f"  {LABEL} | stage 2/2 crt training | epoch 1/4 | 1234 img/s | val_overall=0.4100 | "
        "ETA 0:07"
    )
    view.line(f"{LABEL} | stage 2/2 crt | trained in 9.0s | val_overall=0.5000")
    assert view.lines()[1] == f"  {LABEL} | stage 2/2 crt trained | val_overall=0.5000"
    ended = [(LABEL, "finished", "val_overall=0.4900"), ("lr=0.2 seed=0", "failed", "")]
    view.statuses(ended)
    view.statuses(ended)  # printed once
    view.line(f"{LABEL} | stage 2/2 crt | trained in 9.0s | val_overall=0.5000")  # late: dropped
    assert out.getvalue().splitlines() == [
        f"finished: {LABEL} | val_overall=0.5000",
        "failed: lr=0.2 seed=0",
    ]
    assert view.lines() == [
        "ray-lt quickstart: 0 running · 1 pending · 1 finished · 1 failed · 0:00 elapsed"
    ]
    view.line("ray-lt: a line that is not a stage's")  # kept, above the view
    assert out.getvalue().splitlines()[-1] == "ray-lt: a line that is not a stage's"


def test_the_view_is_drawn_only_on_a_terminal(monkeypatch):
    assert not wanted(io.StringIO())
    master, slave = pty.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            monkeypatch.setenv("TERM", "xterm")
            assert wanted(tty)
            monkeypatch.setenv("TERM", "dumb")
            assert not wanted(tty)
    finally:
        os.close(master)
        os.close(slave)


def test_without_a_view_epoch_lines_go_to_the_log_file_only(tmp_path, capsys):
    console = QuietConsole(str(tmp_path / "console.log"))
    console.open()
    try:
        console.show(f"{LABEL} | stage 1/2 ce | start")
        console.show(f"{LABEL} | stage 1/2 ce | epoch 1/4 | 9 img/s | 1.0 s | ")
        view = console.view = LiveView("x", total=1, out=io.StringIO())
        console.show(f"{LABEL} | stage 1/2 ce | epoch 2/4 | 9 img/s | 1.0 s | ")
    finally:
        console.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"{LABEL} | stage 1/2 ce | start" and len(printed) == 2
    assert "epoch 1/4" in (tmp_path / "console.log").read_text()
    assert view.rows[LABEL].epoch == "2/4"


def _sweep_cmd(workdir: Path, *extra: str) -> list[str]:
    """The quickstart smoke sweep, its stages inline: the view shows the epoch lines a trial
    prints itself; those of a worker group's workers are test_console.py's (a worker group's
    start-up would double this sweep's CPU time)."""
    return sweep_cmd(QUICKSTART, workdir, "--smoke", "--num-workers", "0", *extra)


@pytest.mark.ray
def test_on_a_terminal_the_sweep_is_one_live_view_then_the_summary(tmp_path):
    run = run_on_terminal(_sweep_cmd(tmp_path), tmp_path, timeout=600)
    screen = run.screen
    assert run.returncode == 0, screen[-4000:] + run.stderr[-2000:]
    # the view was drawn: its heading, a trial training with its epoch, speed and ETA
    assert "ray-lt quickstart-smoke: 1 running" in screen or "2 running" in screen, screen[-3000:]
    assert re.search(r"stage \d/2 \w+ training \| epoch 1/\d \| \d+ img/s \| .*ETA ", screen)
    # what stays: a line per finished trial, the final heading, the summary
    finished = [ln for ln in screen.splitlines() if ln.startswith("finished: ")]
    assert len(finished) == 2 and all("seed=0" in ln and "val_overall=" in ln for ln in finished)
    assert "0 running · 0 pending · 2 finished · 0 failed" in screen
    assert "\nsweep 'quickstart-smoke': 2 trials" in screen
    # nothing of Tune's or Ray's on the terminal, and no line at error level
    assert "Configuration for experiment" not in screen and "Trial status" not in screen
    lines = screen.splitlines() + run.stderr.splitlines()
    assert not [ln for ln in lines if " E " in ln or "ERROR" in ln], screen[-3000:]
    assert run.stderr.strip() == "", run.stderr[-2000:]


def test_on_a_terminal_bad_input_is_still_one_error_line(tmp_path):
    run = run_on_terminal(
        _sweep_cmd(tmp_path, "--tracking-uri", "http://127.0.0.1:9"), tmp_path, timeout=120
    )
    assert run.returncode == 2, run.screen + run.stderr
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), run.stderr
    assert "127.0.0.1:9" in errors[0] and "Traceback" not in run.stderr
    assert "running" not in run.screen  # no view was drawn for a sweep that never started
    assert not (tmp_path / "store").exists() or not ArtifactStore(tmp_path / "store").keys()
