"""Per-key lease locks in the artifact store, so two trials never train one stage at once.

A trial that needs a missing artifact takes the key's lock, trains and publishes; a second trial
waits, then reuses the artifact. A dead holder's lock goes stale (its heartbeat stops) and is
broken. The store's file-system helpers do the I/O; this module knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from ray_lt.errors import ArtifactError

if TYPE_CHECKING:
    from ray_lt.artifacts import ArtifactStore

log = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class StageLock:
    """A lease lock at ``<root>/_locks/<key>.lock`` so two trials never train one key at once.

    The file holds JSON ``{owner, host, pid, token, acquired_at, heartbeat_at}``. A daemon thread
    rewrites ``heartbeat_at`` every ``heartbeat_s``; a waiter breaks a lock whose heartbeat is
    older than ``stale_after_s`` (its holder died). On local disks the file is created with
    ``O_CREAT | O_EXCL``, which is atomic. Elsewhere it is written if absent, then re-read to check
    the token: two writers that both see it absent within one round trip can both believe they
    hold it. That race costs a duplicate training run, never a corrupt artifact (``put`` keeps
    one).
    """

    def __init__(
        self,
        store: ArtifactStore,
        key: str,
        owner: str,
        *,
        stale_after_s: float,
        heartbeat_s: float,
    ) -> None:
        self.store, self.key, self.owner = store, key, owner
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.path = store._path("_locks", f"{key}.lock")
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock (False once it was found broken)."""
        return self._token is not None

    def _record(self, acquired_at: float) -> bytes:
        rec = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self._token,
            "acquired_at": acquired_at,
            "heartbeat_at": time.time(),
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
        """Take the lock, waiting for its holder and breaking it if stale.

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
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if should_stop is not None and should_stop():
                return False
            self._token, now = uuid.uuid4().hex, time.time()
            if self._create(self._record(now)):
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._beat, args=(now,), daemon=True, name=f"ray-lt-lock-{self.key}"
                )
                self._thread.start()
                return True
            self._token = None
            seen = self.store._read_bytes(self.path)
            if seen is not None and self._is_stale(seen):
                holder = _token_of(seen, "owner")
                log.warning("breaking stale lock %s of %r (no heartbeat)", self.path, holder)
                self._take_away(lambda now, seen=seen: now == seen)
                continue
            if seen is None:
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return False
            wait = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
            time.sleep(max(wait, 0.0))

    def _is_stale(self, seen: bytes) -> bool:
        try:
            beat = float(json.loads(seen)["heartbeat_at"])
        except (ValueError, KeyError, TypeError):  # half-written: judge by the file's mtime
            info = self.store.fs.get_file_info(self.path)
            if info.mtime is None:
                return False
            beat = info.mtime.timestamp()
        return time.time() - beat > self.stale_after_s

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
        if got is not None and match(got):
            self.store.fs.delete_file(side)
            return True
        # It changed since we looked (a heartbeat or a new holder): restore it unless replaced.
        if self.store._local:
            with contextlib.suppress(FileExistsError):
                os.link(side, self.path)
        elif self.store._read_bytes(self.path) is None:
            self.store.fs.copy_file(side, self.path)
        self.store.fs.delete_file(side)
        return False

    def _beat(self, acquired_at: float) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                seen = self.store._read_bytes(self.path)
                if seen is None:  # briefly moved aside by a waiter: recreate it if still free
                    if self._create(self._record(acquired_at)):
                        continue
                    seen = self.store._read_bytes(self.path)
                if _token_of(seen) != self._token:
                    log.warning(
                        "lock %s was taken from %r; stop relying on it", self.path, self.owner
                    )
                    self._token = None
                    return
                self.store._write_bytes(self.path, self._record(acquired_at))
            except OSError as exc:  # a transient store error: try again next beat
                log.warning("heartbeat of %s failed: %s", self.path, _one_line(exc))

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if this object still owns it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        token, self._token = self._token, None
        if token is not None:
            self._take_away(lambda now: _token_of(now) == token)

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _token_of(raw: bytes | None, field: str = "token") -> str | None:
    try:
        return json.loads(raw or b"")[field]
    except (ValueError, KeyError, TypeError):
        return None
