"""Per-key lease locks in the artifact store, so two trials never train one stage at once.

A trial that needs a missing artifact takes the key's lock, trains and publishes; a second trial
waits, then reuses the artifact. A dead holder's lock is broken: at once when its process on this
host is gone, else when its heartbeat stops for the stale interval. All I/O goes through the
store's file-system layer (``StoreFS``); this module knows nothing of artifacts, Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from ray_lt.errors import ArtifactError, ConfigError
from ray_lt.liveness import owner_alive, process_space, process_start
from ray_lt.store_layout import LOCKS_DIR
from ray_lt.storefs import StoreFS, one_line, temp_files_of

log = logging.getLogger(__name__)
#: A lock moved aside while being broken or released: ``<key>.stale-<uuid>``.
SIDE_FILE_RE = re.compile(r".+\.stale-[0-9a-f]{32}")


def lock_path(fs: StoreFS, key: str) -> str:
    """Where the lock of ``key`` lives: ``<root>/_locks/<key>.lock``."""
    return fs.path(LOCKS_DIR, f"{key}.lock")


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from environment variable ``name`` (``default`` if unset);
    anything else is a ConfigError naming the variable."""
    raw = os.environ.get(name)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ConfigError(
            f"{name}={raw!r} is not a positive number of seconds; set e.g. {name}=60"
        )
    return value


def stale_s() -> float:
    """The lock stale interval: also how old a temporary file must be to count as a leftover."""
    return env_seconds("RAY_LT_LOCK_STALE_S", 120.0)


def lock_settings(
    stale_after_s: float | None = None, heartbeat_s: float | None = None
) -> tuple[float, float]:
    """(stale interval, heartbeat interval), each from the environment unless given; a
    heartbeat that is not shorter than the stale interval would let a live lock be broken."""
    stale = stale_s() if stale_after_s is None else stale_after_s
    beat = env_seconds("RAY_LT_LOCK_HEARTBEAT_S", 10.0) if heartbeat_s is None else heartbeat_s
    if not 0 < beat < stale:
        raise ConfigError(
            f"lock heartbeat {beat} s must be positive and shorter than stale_after {stale} s;"
            " lower RAY_LT_LOCK_HEARTBEAT_S or raise RAY_LT_LOCK_STALE_S"
        )
    return stale, beat


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


class Sweeper(Protocol):
    """The store's leftover sweep, as a lock calls it after breaking a dead holder's lock."""

    def __call__(self, older_than_s: float, *, now: float) -> object: ...


class StageLock:
    """A lease lock at ``<root>/_locks/<key>.lock`` so two trials never train one key at once.

    The file holds JSON ``{owner, host, space, pid, started, token, acquired_at, heartbeat_at}``.
    A daemon thread rewrites ``heartbeat_at`` every ``heartbeat_s``. A waiter breaks the lock at
    once when its holder's process on this host is gone (``space``, ``pid`` and ``started`` tell
    it), else when the heartbeat is older than ``stale_after_s``; breaking also removes the
    holder's leftover temporary files. The file is created with ``StoreFS.create_exclusive``:
    atomic on local disks; elsewhere two writers that both see it absent within one round trip
    can both believe they hold it. That race costs a duplicate training run, never a corrupt
    artifact (the store's ``put`` keeps one).

    Args:
        fs: the store's file system.
        key: the stage key (already checked by the store).
        owner: who holds it (a trial id), written into the lock file.
        stale_after_s: a lock whose heartbeat is older is broken.
        heartbeat_s: how often the holder refreshes it.
        clock: wall time, sleeping and waiting (tests pass a fake one; default real time).
        sweep: called after this lock broke a dead holder's, so that what the holder's killed
            writers left goes too (the store's leftover sweep).
    """

    def __init__(
        self,
        fs: StoreFS,
        key: str,
        owner: str,
        *,
        stale_after_s: float,
        heartbeat_s: float,
        clock: Clock | None = None,
        sweep: Sweeper | None = None,
    ) -> None:
        self.fs, self.key, self.owner = fs, key, owner
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.clock = clock or Clock()
        self.path = lock_path(fs, key)
        self._sweep = sweep
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
            "space": process_space(),
            "pid": pid,
            "started": process_start(pid),
            "token": self._token,
            "acquired_at": self._acquired_at,
            "heartbeat_at": self.clock.time(),
        }
        return json.dumps(rec).encode()

    def _create(self, data: bytes) -> bool:
        """Create the lock file if absent; True if this call created it (on object stores: if
        the file read back holds this record's token)."""
        token = json.loads(data)["token"]
        return self.fs.create_exclusive(self.path, data, lambda got: _token_of(got) == token)

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
        self.fs.makedirs(self.fs.path(LOCKS_DIR))
        deadline = None if timeout_s is None else self.clock.monotonic() + timeout_s
        while True:
            if should_stop is not None and should_stop():
                return False
            if self._try_create():
                return True
            seen = self.fs.read_bytes(self.path)
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
            return self.fs.mtime(self.path)

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
                self.fs.remove_file(path)
        if self._sweep is not None:
            self._sweep(self.stale_after_s, now=self.clock.time())
        return True

    def _holder_temp_files(self) -> list[str]:
        """The lock's own ``.<key>.lock.<uuid>.tmp`` files (heartbeat writes in flight); listed
        before a lock is broken, so a new holder's later writes are never among them."""
        name = temp_files_of(f"{self.key}.lock")
        try:
            found = self.fs.entries(self.fs.path(LOCKS_DIR))
        except OSError:
            return []
        return [e.path for e in found if name.fullmatch(e.name)]

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
        side = self.fs.path(LOCKS_DIR, f"{self.key}.stale-{uuid.uuid4().hex}")
        try:
            self.fs.rename(self.path, side)
        except OSError:
            return False  # someone else moved it first
        got = self.fs.read_bytes(side)
        if got is None:
            return False  # swept meanwhile as a stale leftover: it is gone, nothing to restore
        if match(got):
            self._delete(side)
            return True
        # It changed since we looked (a heartbeat or a new holder): restore it unless replaced.
        self.fs.copy_if_absent(side, self.path)
        self._delete(side)
        return False

    def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.remove_file(path)

    def _beat(self) -> None:
        while not self.clock.wait(self._stop, self.heartbeat_s):
            if not self.heartbeat():
                return

    def heartbeat(self) -> bool:
        """Refresh ``heartbeat_at`` now (the daemon thread calls this every ``heartbeat_s``);
        False once the lock was taken from this holder, which then stops relying on it."""
        try:
            seen = self.fs.read_bytes(self.path)
            if seen is None:  # briefly moved aside by a waiter: recreate it if still free
                if self._create(self._record()):
                    return True
                seen = self.fs.read_bytes(self.path)
            if _token_of(seen) != self._token:
                log.warning("lock %s was taken from %r; stop relying on it", self.path, self.owner)
                self._token = None
                return False
            self.fs.write_bytes(self.path, self._record())
        except OSError as exc:  # a transient store error: try again next beat
            log.warning("heartbeat of %s failed: %s", self.path, one_line(exc))
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


class LockingStore(Protocol):
    """What ``release_dead_locks`` needs of a store: its file system and its locks (which carry
    the store's stale interval and leftover sweep)."""

    storefs: StoreFS

    def lock(self, key: str, owner: str) -> StageLock: ...


def release_dead_locks(store: LockingStore, wait_s: float = 5.0) -> list[str]:
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
        for key, seen in _lock_files(store.storefs):
            alive = owner_alive(_parse(seen))
            if alive is False and store.lock(key, "sweep driver")._break_if_dead(seen):
                freed.append(key)
            waiting |= alive is True
        if not waiting or time.monotonic() >= deadline:
            return freed
        time.sleep(0.25)


def _lock_files(fs: StoreFS) -> list[tuple[str, bytes]]:
    """(key, content) of every lock file in the store."""
    out = []
    for entry in fs.entries(fs.path(LOCKS_DIR)):
        if entry.name.endswith(".lock") and not entry.name.startswith("."):
            seen = fs.read_bytes(entry.path)
            if seen is not None:
                out.append((entry.name[: -len(".lock")], seen))
    return out
