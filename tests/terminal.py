"""A command run on a real pseudo-terminal, as a user at a terminal runs it.

The sweep's live view is drawn only when its standard output is a terminal, so these tests give
the subprocess the slave side of a pty (standard error stays a pipe, so that what the driver
writes there after the view is gone can be checked on its own) and read the master side.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]")


@dataclass
class TerminalRun:
    returncode: int
    screen: str  # everything written to the terminal, escape sequences removed, \r as \n
    stderr: str
    seconds: float


def plain(raw: str) -> str:
    """Terminal output as text: escape sequences dropped, carriage returns as line ends."""
    return ANSI.sub("", raw).replace("\r\n", "\n").replace("\r", "\n")


def run_on_terminal(
    cmd: list[str],
    cwd: str | os.PathLike,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    interrupt_when: Callable[[str], bool] | None = None,
) -> TerminalRun:
    """Run ``cmd`` with a pty as stdout; with ``interrupt_when``, send SIGINT (Ctrl-C) once the
    screen so far satisfies it. Returns the screen, stderr and the exit status."""
    master, slave = pty.openpty()
    env = {**os.environ, **(env or {}), "TERM": "xterm-256color", "COLUMNS": "160"}
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE
    )
    os.close(slave)
    chunks: list[bytes] = []
    interrupted = interrupt_when is None
    try:
        while True:
            assert time.monotonic() - started < timeout, plain(b"".join(chunks).decode())[-4000:]
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
            if not interrupted and interrupt_when(
                plain(b"".join(chunks).decode(errors="replace"))
            ):
                proc.send_signal(signal.SIGINT)
                interrupted = True
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        proc.wait(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    screen = plain(b"".join(chunks).decode(errors="replace"))
    return TerminalRun(proc.returncode, screen, stderr, time.monotonic() - started)
