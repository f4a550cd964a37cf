"""Per-key lease locks in the artifact store, so two trials never train one stage at once.

A trial that needs a missing artifact takes the key's lock, trains and publishes; a second trial
waits, then reuses the artifact. A dead holder's lock is broken: at once when its process on this
host is gone, else when its heartbeat stops for the stale interval. The store's file-system
helpers do the I/O; this module knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from ray_lt.errors import ArtifactError

if TYPE_CHECKING:
    from ray_lt.artifacts import ArtifactStore

log = logging.getLogger(__name__)
_PROC = "/proc"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def hms(ts: float) -> str:
    """A wall-clock time as local ``HH:MM:SS``, short enough for a console line."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


class Clock:
    """Wall time, monotonic time, sleeping and timed waits in one object, so that tests can
    replace all of them and judge staleness without racing real time."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait for ``event`` up to ``seconds``; True if it was set (the heartbeat's pause)."""
        return event.wait(seconds)


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
def _process_space() -> str:
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
    if not rec or rec.get("space") != _process_space():
        return None
    pid, started = rec.get("pid"), rec.get("started")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(started, str) or not started:
        return None
    now = process_start(pid)
    if now is None:
        return None
    return now == started


class StageLock:
    """A lease lock at ``<root>/_locks/<key>.lock`` so two trials never train one key at once.

    The file holds JSON ``{owner, host, space, pid, started, token, acquired_at, heartbeat_at}``.
    A daemon thread rewrites ``heartbeat_at`` every ``heartbeat_s``. A waiter breaks the lock at
    once when its holder's process on this host is gone (``space``, ``pid`` and ``started`` tell
    it), else when the heartbeat is older than ``stale_after_s``; breaking also removes the
    holder's leftover temporary files. On local disks the file is created with
    ``O_CREAT | O_EXCL``, which is atomic. Elsewhere it is written if absent, then re-read to
    check the token: two writers that both see it absent within one round trip can both believe
    they hold it. That race costs a duplicate training run, never a corrupt artifact (``put``
    keeps one).
    """

    def __init__(
        self,
        store: ArtifactStore,
        key: str,
        owner: str,
        *,
        stale_after_s: float,
        heartbeat_s: float,
        clock: Clock | None = None,
    ) -> None:
        self.store, self.key, self.owner = store, key, owner
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.clock = clock or Clock()
        self.path = store._path("_locks", f"{key}.lock")
        self._token: str | None = None
        self._acquired_at = 0.0
        self._announced: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock (False once it was found broken)."""
        return self._token is not None

    def _record(self) -> bytes:
        pid = os.getpid()
        rec = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "space": _process_space(),
            "pid": pid,
            "started": process_start(pid),
            "token": self._token,
            "acquired_at": self._acquired_at,
            "heartbeat_at": self.clock.time(),
        }
        return json.dumps(rec).encode()

    def _create(self, data: bytes) -> bool:
        """Create the lock file if absent; True if this call created it."""
        if self.store._local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.store._read_bytes(self.path) is not None:
            return False
        self.store._write_bytes(self.path, data)
        return _token_of(self.store._read_bytes(self.path)) == json.loads(data)["token"]

    def acquire(
        self,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Take the lock, waiting for its holder and breaking it if the holder is dead.

        Args:
            timeout_s: give up after this long (None: wait forever).
            poll_s: seconds between attempts.
            should_stop: checked before each attempt; True (e.g. the artifact appeared) makes
                this return False without acquiring.

        Returns:
            True if acquired; False if ``should_stop`` said so or the timeout passed.
        """
        if self.held:
            raise ArtifactError(f"lock {self.path} is already held by this {self.owner!r} object")
        if self.store._local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        deadline = None if timeout_s is None else self.clock.monotonic() + timeout_s
        while True:
            if should_stop is not None and should_stop():
                return False
            if self._try_create():
                return True
            seen = self.store._read_bytes(self.path)
            if seen is None or self._break_if_dead(seen):
                continue
            left = None if deadline is None else deadline - self.clock.monotonic()
            if left is not None and left <= 0:
                return False
            self._announce(seen)
            self.clock.sleep(poll_s if left is None else min(poll_s, left))

    def _try_create(self) -> bool:
        """Create the lock file with a fresh token and start the heartbeat; False if it exists."""
        self._token, self._acquired_at = uuid.uuid4().hex, self.clock.time()
        if not self._create(self._record()):
            self._token = None
            return False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, daemon=True, name=f"ray-lt-lock-{self.key}"
        )
        self._thread.start()
        return True

    def _why_dead(self, seen: bytes) -> str | None:
        """Why the lock in ``seen`` may be broken, or None while its holder counts as alive."""
        rec = _parse(seen)
        if owner_alive(rec) is False:
            return "its process is gone"
        beat = self._last_beat(rec)
        if beat is not None and self.clock.time() - beat > self.stale_after_s:
            return f"no heartbeat since {hms(beat)}"
        return None

    def _last_beat(self, rec: dict[str, Any] | None) -> float | None:
        """The holder's last heartbeat; a half-written file is judged by its mtime."""
        try:
            return float((rec or {})["heartbeat_at"])
        except (KeyError, TypeError, ValueError):
            info = self.store.fs.get_file_info(self.path)
            return None if info.mtime is None else info.mtime.timestamp()

    def _break_if_dead(self, seen: bytes) -> bool:
        """Break the lock in ``seen`` if its holder is dead; True if it is gone now."""
        why = self._why_dead(seen)
        if why is None:
            return False
        leftovers = self._holder_temp_files()
        if not self._take_away(lambda now: now == seen):
            return False
        rec = _parse(seen) or {}
        log.warning("broke lock %s of %s: %s", self.path, _holder(rec), why)
        for path in leftovers:
            with contextlib.suppress(OSError):
                self.store.fs.delete_file(path)
        self.store.sweep(self.stale_after_s, now=self.clock.time())
        return True

    def _holder_temp_files(self) -> list[str]:
        """The lock's own ``.<key>.lock.<uuid>.tmp`` files (heartbeat writes in flight); listed
        before a lock is broken, so a new holder's later writes are never among them."""
        name = re.compile(re.escape(f".{self.key}.lock.") + r"[0-9a-f]{32}\.tmp")
        folder = self.store._path("_locks")
        sel = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
        try:
            infos = self.store.fs.get_file_info(sel)
        except OSError:
            return []
        return [i.path for i in infos if name.fullmatch(i.base_name)]

    def _announce(self, seen: bytes) -> None:
        """Say once per lock (token) whose lock this waiter waits on, and until when."""
        rec = _parse(seen) or {}
        token = str(rec.get("token"))
        if token == self._announced:
            return
        self._announced = token
        beat = self._last_beat(rec or None)
        until = "unknown" if beat is None else hms(beat + self.stale_after_s)
        log.warning(
            "%r waits for lock %s (key %s) held by %s; if its heartbeat stops it is broken at %s",
            self.owner, self.path, self.key, _holder(rec), until,
        )  # fmt: skip

    def _take_away(self, match: Callable[[bytes], bool]) -> bool:
        """Move the lock file aside and delete it if ``match``es its content, else put it back."""
        side = self.store._path("_locks", f"{self.key}.stale-{uuid.uuid4().hex}")
        try:
            if self.store._local:
                os.rename(self.path, side)
            else:
                self.store.fs.move(self.path, side)
        except OSError:
            return False  # someone else moved it first
        got = self.store._read_bytes(side)
        if got is None:
            return False  # swept meanwhile as a stale leftover: it is gone, nothing to restore
        if match(got):
            self._delete(side)
            return True
        # It changed since we looked (a heartbeat or a new holder): restore it unless replaced.
        if self.store._local:
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                os.link(side, self.path)
        elif self.store._read_bytes(self.path) is None:
            with contextlib.suppress(FileNotFoundError):
                self.store.fs.copy_file(side, self.path)
        self._delete(side)
        return False

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.delete_file(path)

    def _beat(self) -> None:
        while not self.clock.wait(self._stop, self.heartbeat_s):
            if not self.heartbeat():
                return

    def heartbeat(self) -> bool:
        """Refresh ``heartbeat_at`` now (the daemon thread calls this every ``heartbeat_s``);
        False once the lock was taken from this holder, which then stops relying on it."""
        try:
            seen = self.store._read_bytes(self.path)
            if seen is None:  # briefly moved aside by a waiter: recreate it if still free
                if self._create(self._record()):
                    return True
                seen = self.store._read_bytes(self.path)
            if _token_of(seen) != self._token:
                log.warning("lock %s was taken from %r; stop relying on it", self.path, self.owner)
                self._token = None
                return False
            self.store._write_bytes(self.path, self._record())
        except OSError as exc:  # a transient store error: try again next beat
            log.warning("heartbeat of %s failed: %s", self.path, _one_line(exc))
        return True

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if this object still owns it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        token, self._token = self._token, None
        self._announced = None
        if token is not None:
            self._take_away(lambda now: _token_of(now) == token)

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(rec: dict[str, Any]) -> str:
    return f"{rec.get('owner')!r} (host {rec.get('host')}, pid {rec.get('pid')})"


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw or b"")
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _token_of(raw: bytes | None, field: str = "token") -> str | None:
    rec = _parse(raw)
    return None if rec is None else rec.get(field)


def release_dead_locks(store: ArtifactStore, wait_s: float = 5.0) -> list[str]:
    """Break every lock in ``store`` whose holder process on this host is gone; the keys freed.

    The sweep driver calls this after an interrupt has shut Ray down: the trial processes that
    held locks were ended without running their ``finally`` blocks. Their exits can lag the
    shutdown by a moment, so locks whose holders still run here are looked at again for up to
    ``wait_s``. Locks of other hosts are left to their heartbeats.
    """
    freed: list[str] = []
    deadline = time.monotonic() + wait_s
    while True:
        waiting = False
        for key, seen in _lock_files(store):
            alive = owner_alive(_parse(seen))
            if alive is False and store.lock(key, "sweep driver")._break_if_dead(seen):
                freed.append(key)
            waiting |= alive is True
        if not waiting or time.monotonic() >= deadline:
            return freed
        time.sleep(0.25)


def _lock_files(store: ArtifactStore) -> list[tuple[str, bytes]]:
    """(key, content) of every lock file in the store."""
    sel = pafs.FileSelector(store._path("_locks"), recursive=False, allow_not_found=True)
    out = []
    for info in store.fs.get_file_info(sel):
        if info.base_name.endswith(".lock") and not info.base_name.startswith("."):
            seen = store._read_bytes(info.path)
            if seen is not None:
                out.append((info.base_name[: -len(".lock")], seen))
    return out
