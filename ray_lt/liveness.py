"""Whether the process that wrote a lock record still runs, judged on this host.

A lock records its holder's pid, the pid's start time and the "process space" (host, boot and
pid namespace) it was written in. A waiter in the same space can then tell a killed holder at
once, without waiting for its heartbeat to go stale, and is never fooled by a reused pid.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Any

_PROC = "/proc"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` as text, so that a reused pid is not taken for the
    process that wrote a lock; ``""`` if no such live process exists, None if this host cannot
    tell (then the lock is judged by its heartbeat)."""
    if os.path.exists(f"{_PROC}/self/stat"):
        return _proc_start(pid)
    try:
        import psutil
    except ImportError:
        return None
    try:
        proc = psutil.Process(pid)
        return "" if proc.status() == psutil.STATUS_ZOMBIE else repr(proc.create_time())
    except psutil.NoSuchProcess:
        return ""
    except psutil.Error:
        return None


def _proc_start(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot); a zombie is
    gone (a killed holder whose parent has not reaped it yet)."""
    try:
        with open(f"{_PROC}/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the name in (...) may hold spaces
    if len(fields) < 20:
        return None
    return "" if fields[0] in ("Z", "X") else fields[19]


@functools.cache
def process_space() -> str:
    """Where a pid names one process: the host name, plus on Linux the boot and the pid
    namespace, so containers that share a host name never judge each other's pids."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open(f"{_PROC}/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        parts += [boot, os.readlink(f"{_PROC}/self/ns/pid")]
    return "/".join(parts)


def owner_alive(rec: dict[str, Any] | None) -> bool | None:
    """Whether the process that wrote lock record ``rec`` still runs: False if it is gone or
    its pid was reused, None when this process cannot tell (another host, an old record)."""
    if not rec or rec.get("space") != process_space():
        return None
    pid, started = rec.get("pid"), rec.get("started")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(started, str) or not started:
        return None
    now = process_start(pid)
    if now is None:
        return None
    return now == started
