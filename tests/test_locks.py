"""Tests for ray_lt.locks and the store's leftover sweep: real files, real killed processes, and
a fake clock wherever staleness matters, so no test races real time on a loaded machine."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ray_lt import liveness
from ray_lt.artifacts import ArtifactStore
from ray_lt.errors import ConfigError
from ray_lt.locks import Clock, hms, owner_alive, process_start

from .test_artifacts import make_stage_dir

KEY = "teacher-0123456789abcdef"
PATIENCE_S = 120  # how long a test waits for a child process to get ready (never asserted)


class FakeClock(Clock):
    """Time moves only when a waiter sleeps or the test advances it; heartbeats only when the
    test calls ``heartbeat()``."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait()  # the heartbeat thread just waits for release

    def advance(self, seconds: float) -> None:
        self.now += seconds


def lock_path(root: Path) -> Path:
    return root / "_locks" / f"{KEY}.lock"


def write_lock(root: Path, **fields: object) -> Path:
    """Write a lock file as some other holder would."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"owner": "other", "host": "elsewhere", "pid": 1, "token": "t", **fields}
    path.write_text(json.dumps(rec))
    return path


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def set_age(path: Path, seconds: float) -> None:
    """Make ``path`` and everything in it ``seconds`` old."""
    stamp = time.time() - seconds
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (stamp, stamp))


def lock_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ray_lt.locks" and text in r.msg]


# -- child processes (spawned, so module level) -----------------------------------------------


def _locked_appender(root: str, log_path: str, name: str, rounds: int) -> None:
    store = ArtifactStore(root)
    for _ in range(rounds):
        lock = store.lock(KEY, name, stale_after_s=600, heartbeat_s=1)
        assert lock.acquire(poll_s=0.01)
        try:
            with open(log_path, "a") as f:
                f.write(f"start {name}\n")
                f.flush()
            time.sleep(0.02)  # a window in which a second holder would interleave
            with open(log_path, "a") as f:
                f.write(f"end {name}\n")
        finally:
            lock.release()


def _hold_forever(root: str, ready_path: str) -> None:
    ArtifactStore(root).lock(KEY, "doomed", stale_after_s=600, heartbeat_s=300).acquire()
    Path(ready_path).write_text("ready")
    time.sleep(3600)


def _hold_and_hang_in_heartbeat(root: str, ready_path: str) -> None:
    """Hold the lock, then hang inside the heartbeat's write after its temp file exists."""
    lock = ArtifactStore(root).lock(KEY, "doomed", stale_after_s=600, heartbeat_s=0.01)

    def hang(fd: int) -> None:
        Path(ready_path).write_text("ready")
        time.sleep(3600)

    assert lock.acquire()
    os.fsync = hang  # the next heartbeat writes its temp file, then hangs before os.replace
    time.sleep(3600)


def run_then_kill(target: Callable[..., None], root: Path) -> int:
    """Start ``target`` in a child, wait until it says ready, SIGKILL and reap it; its pid."""
    ready = root / "ready"
    proc = mp.get_context("spawn").Process(target=target, args=(str(root), str(ready)))
    proc.start()
    try:
        deadline = time.monotonic() + PATIENCE_S
        while not ready.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), f"child exited with {proc.exitcode} before it was ready"
    finally:
        proc.kill()  # SIGKILL
        proc.join()
    ready.unlink()
    return proc.pid


# -- exclusion and killed holders -------------------------------------------------------------


def test_lock_is_exclusive_across_processes(tmp_path):
    ctx = mp.get_context("spawn")
    log_path = tmp_path / "log.txt"
    procs = [
        ctx.Process(target=_locked_appender, args=(str(tmp_path), str(log_path), n, 6))
        for n in ("a", "b")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = log_path.read_text().splitlines()
    assert len(lines) == 24
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start.startswith("start ") and end == "end " + start[6:]
    assert list((tmp_path / "_locks").iterdir()) == []


def test_holder_killed_during_heartbeat_write_leaves_no_file(tmp_path, caplog):
    pid = run_then_kill(_hold_and_hang_in_heartbeat, tmp_path)
    (temp,) = [p.name for p in (tmp_path / "_locks").iterdir() if p.name != f"{KEY}.lock"]
    assert lock_path(tmp_path).exists() and re.fullmatch(
        rf"\.{KEY}\.lock\.[0-9a-f]{{32}}\.tmp", temp
    )
    caplog.set_level(logging.WARNING, logger="ray_lt.locks")
    waiter = ArtifactStore(tmp_path).lock(KEY, "waiter", stale_after_s=600, heartbeat_s=300)
    assert waiter.acquire(timeout_s=0)  # the holder's process is gone: no need to wait
    assert sorted(p.name for p in (tmp_path / "_locks").iterdir()) == [f"{KEY}.lock"]
    assert json.loads(lock_path(tmp_path).read_text())["owner"] == "waiter"
    waiter.release()
    assert list((tmp_path / "_locks").iterdir()) == []
    assert lock_lines(caplog, "broke lock") == [
        f"broke lock {lock_path(tmp_path)} of 'doomed' (host {socket.gethostname()}, "
        f"pid {pid}): its process is gone"
    ]


def test_killed_holder_on_this_host_is_broken_at_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ray_lt.locks")
    store = ArtifactStore(tmp_path)
    ready = tmp_path / "ready"
    proc = mp.get_context("spawn").Process(target=_hold_forever, args=(str(tmp_path), str(ready)))
    proc.start()
    try:
        deadline = time.monotonic() + PATIENCE_S
        while not ready.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists()
        # a live holder on this host is kept, whatever the waiter's patience
        assert not store.lock(KEY, "early", stale_after_s=600, heartbeat_s=300).acquire(0)
        assert lock_lines(caplog, "broke lock") == []
    finally:
        proc.kill()  # SIGKILL
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
    waiter = store.lock(KEY, "waiter", stale_after_s=600, heartbeat_s=300)
    assert waiter.acquire(timeout_s=0)
    record = json.loads(lock_path(tmp_path).read_text())
    assert record["owner"] == "waiter" and record["pid"] == os.getpid()
    (line,) = lock_lines(caplog, "broke lock")
    assert f"of 'doomed' (host {socket.gethostname()}, pid {proc.pid})" in line
    assert "its process is gone" in line
    waiter.release()
    assert list((tmp_path / "_locks").iterdir()) == []


def test_broken_stale_lock_takes_its_holder_temp_files_along(tmp_path):
    path = write_lock(tmp_path, heartbeat_at=time.time() - 1000)  # another host, long silent
    leftover = path.parent / f".{KEY}.lock.{uuid.uuid4().hex}.tmp"
    leftover.write_text('{"owner": "other", "tok')  # its heartbeat write, cut short
    other = path.parent / f".student-0123456789abcdef.lock.{uuid.uuid4().hex}.tmp"
    other.write_text("{}")  # another key's live write in flight: not this holder's
    waiter = ArtifactStore(tmp_path).lock(KEY, "waiter", stale_after_s=600, heartbeat_s=300)
    assert waiter.acquire(timeout_s=0)
    waiter.release()
    assert [p.name for p in path.parent.iterdir()] == [other.name]


def test_reused_pid_is_a_dead_owner(tmp_path):
    store = ArtifactStore(tmp_path)
    me = {"host": socket.gethostname(), "space": liveness.process_space(), "pid": os.getpid()}
    started = process_start(os.getpid())
    assert started
    write_lock(tmp_path, **me, started=started, heartbeat_at=time.time())
    assert not store.lock(KEY, "w", stale_after_s=600, heartbeat_s=300).acquire(timeout_s=0)
    write_lock(tmp_path, **me, started=started + "0", heartbeat_at=time.time())
    waiter = store.lock(KEY, "waiter", stale_after_s=600, heartbeat_s=300)
    assert waiter.acquire(timeout_s=0)  # the pid runs, but it is not the process that wrote it
    waiter.release()


def test_other_host_lock_is_judged_by_heartbeat_age_only(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ray_lt.locks")
    clock = FakeClock()
    beat = clock.time()
    gone = {"host": "elsewhere", "space": "elsewhere", "pid": dead_pid(), "started": "1"}
    write_lock(tmp_path, **gone, heartbeat_at=beat)
    waiter = ArtifactStore(tmp_path).lock(
        KEY, "w", stale_after_s=600, heartbeat_s=300, clock=clock
    )
    assert not waiter.acquire(timeout_s=599, poll_s=10)  # its pid means nothing here
    assert lock_lines(caplog, "broke lock") == []
    assert waiter.acquire(timeout_s=30, poll_s=10)
    assert clock.time() - beat > 600
    (line,) = lock_lines(caplog, "broke lock")
    assert f"no heartbeat since {hms(beat)}" in line and "'other' (host elsewhere" in line
    waiter.release()


def test_waiter_says_once_whose_lock_it_waits_for(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ray_lt.locks")
    clock = FakeClock()
    store = ArtifactStore(tmp_path)
    holder = store.lock(KEY, "holder", stale_after_s=60, heartbeat_s=10, clock=clock)
    assert holder.acquire(timeout_s=0)
    beat = json.loads(lock_path(tmp_path).read_text())["heartbeat_at"]
    waiter = store.lock(KEY, "waiter", stale_after_s=60, heartbeat_s=10, clock=clock)
    assert not waiter.acquire(timeout_s=50, poll_s=1)
    assert not waiter.acquire(timeout_s=5, poll_s=1)
    assert lock_lines(caplog, "waits for") == [
        f"'waiter' waits for lock {lock_path(tmp_path)} (key {KEY}) held by 'holder' "
        f"(host {socket.gethostname()}, pid {os.getpid()}); if its heartbeat stops it is "
        f"broken at {hms(beat + 60)}"
    ]
    holder.release()
    assert waiter.acquire(timeout_s=0)
    waiter.release()


# -- heartbeat, should_stop, release, settings ------------------------------------------------


def test_heartbeat_keeps_a_live_lock(tmp_path):
    clock = FakeClock()
    store = ArtifactStore(tmp_path)
    holder = store.lock(KEY, "holder", stale_after_s=10, heartbeat_s=1, clock=clock)
    assert holder.acquire(timeout_s=0)
    first = json.loads(lock_path(tmp_path).read_text())["heartbeat_at"]
    waiter = store.lock(KEY, "waiter", stale_after_s=10, heartbeat_s=1, clock=clock)
    for _ in range(3):  # 27 s, far past the stale interval, kept alive by the heartbeats
        clock.advance(9)
        assert holder.heartbeat()
        assert not waiter.acquire(timeout_s=0)
    record = json.loads(lock_path(tmp_path).read_text())
    assert record["owner"] == "holder" and record["heartbeat_at"] == pytest.approx(first + 27)
    assert holder.held
    clock.advance(11)  # alive but silent (a hung heartbeat): broken after the stale interval
    assert waiter.acquire(timeout_s=0)
    assert not holder.heartbeat() and not holder.held
    holder.release()
    assert json.loads(lock_path(tmp_path).read_text())["owner"] == "waiter"
    waiter.release()
    assert not lock_path(tmp_path).exists()


def test_heartbeat_thread_rewrites_the_lock(tmp_path):
    holder = ArtifactStore(tmp_path).lock(KEY, "holder", stale_after_s=600, heartbeat_s=0.01)
    assert holder.acquire(timeout_s=0)
    first = json.loads(lock_path(tmp_path).read_text())["heartbeat_at"]
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        raw = lock_path(tmp_path).read_text()
        if raw and json.loads(raw)["heartbeat_at"] != first:
            break
        time.sleep(0.01)
    assert json.loads(lock_path(tmp_path).read_text())["heartbeat_at"] > first
    holder.release()
    assert list((tmp_path / "_locks").iterdir()) == []


def test_should_stop_returns_without_acquiring(tmp_path):
    clock = FakeClock()
    store = ArtifactStore(tmp_path)
    calls = []

    def artifact_appeared() -> bool:
        calls.append(1)
        if len(calls) == 3:  # another trial publishes while this one waits
            store.put(KEY, make_stage_dir(tmp_path / "out"))
        return store.contains(KEY)

    with store.lock(KEY, "trainer", stale_after_s=30, heartbeat_s=1, clock=clock):
        waiter = store.lock(KEY, "waiter", stale_after_s=30, heartbeat_s=1, clock=clock)
        assert not waiter.acquire(poll_s=1, should_stop=artifact_appeared)
        assert len(calls) == 3 and not waiter.held
        assert json.loads(lock_path(tmp_path).read_text())["owner"] == "trainer"
    assert not store.lock(KEY, "late").acquire(should_stop=lambda: True)
    assert not lock_path(tmp_path).exists()


def test_release_never_deletes_someone_elses_lock(tmp_path):
    store = ArtifactStore(tmp_path)
    lock = store.lock(KEY, "me", stale_after_s=30, heartbeat_s=10)
    assert lock.acquire(timeout_s=0)
    path = write_lock(tmp_path, heartbeat_at=time.time())
    lock.release()
    assert json.loads(path.read_text())["owner"] == "other"


def test_lock_settings_are_checked(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    monkeypatch.setenv("RAY_LT_LOCK_STALE_S", "soon")
    with pytest.raises(ConfigError, match="RAY_LT_LOCK_STALE_S='soon'"):
        store.lock(KEY, "me")
    monkeypatch.setenv("RAY_LT_LOCK_STALE_S", "5")
    monkeypatch.setenv("RAY_LT_LOCK_HEARTBEAT_S", "7")
    with pytest.raises(ConfigError, match="shorter than"):
        store.lock(KEY, "me")
    monkeypatch.setenv("RAY_LT_LOCK_HEARTBEAT_S", "1")
    lock = store.lock(KEY, "me")
    assert (lock.stale_after_s, lock.heartbeat_s, lock.owner) == (5.0, 1.0, "me")


def test_half_written_lock_is_judged_by_its_age(tmp_path):
    store = ArtifactStore(tmp_path)
    path = lock_path(tmp_path)
    path.parent.mkdir()
    path.write_bytes(b"")  # a holder that died between O_EXCL create and its first write
    clock = FakeClock(path.stat().st_mtime)
    lock = store.lock(KEY, "me", stale_after_s=30, heartbeat_s=1, clock=clock)
    assert not lock.acquire(timeout_s=29, poll_s=1)
    assert lock.acquire(timeout_s=5, poll_s=1)
    assert json.loads(path.read_text())["owner"] == "me"
    lock.release()


# -- liveness helpers -------------------------------------------------------------------------


def test_process_start_and_owner_alive(monkeypatch):
    mine, gone = process_start(os.getpid()), dead_pid()
    assert mine and process_start(os.getpid()) == mine and process_start(gone) == ""
    here = {"space": liveness.process_space(), "pid": os.getpid(), "started": mine}
    assert owner_alive(here) is True
    assert owner_alive({**here, "pid": gone}) is False
    assert owner_alive({**here, "started": mine + "0"}) is False
    assert owner_alive({**here, "space": "elsewhere"}) is None
    assert owner_alive({**here, "started": None}) is None  # a record of an older version
    assert owner_alive(None) is None
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(liveness, "_PROC", "/nonexistent-proc")  # e.g. macOS: psutil answers
    assert process_start(os.getpid()) == repr(psutil.Process().create_time())
    assert process_start(gone) == ""


# -- a non-local filesystem (SubTreeFileSystem) -----------------------------------------------


def test_lock_on_non_local_filesystem(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    store = ArtifactStore("prefix", filesystem=fs)
    locks_dir = tmp_path / "bucket/prefix/_locks"
    with store.lock(KEY, "trial-1", stale_after_s=600, heartbeat_s=300) as held:
        assert held.held
        assert json.loads((locks_dir / f"{KEY}.lock").read_text())["owner"] == "trial-1"
        assert not store.lock(KEY, "trial-2", stale_after_s=600, heartbeat_s=300).acquire(0)
    assert list(locks_dir.iterdir()) == []
    clock = FakeClock()
    dead = {"owner": "dead", "host": "elsewhere", "token": "t", "heartbeat_at": clock.time()}
    (locks_dir / f"{KEY}.lock").write_text(json.dumps(dead))
    (locks_dir / f".{KEY}.lock.{uuid.uuid4().hex}.tmp").write_text("{")
    lock = store.lock(KEY, "trial-3", stale_after_s=5, heartbeat_s=1, clock=clock)
    assert not lock.acquire(timeout_s=4, poll_s=1)
    assert lock.acquire(timeout_s=5, poll_s=1)
    assert sorted(p.name for p in locks_dir.iterdir()) == [f"{KEY}.lock"]
    lock.release()
    assert list(locks_dir.iterdir()) == []


# -- the sweep of leftovers -------------------------------------------------------------------


@pytest.fixture(params=["local", "subtree"])
def store_root(request, tmp_path) -> tuple[ArtifactStore, Path]:
    """A store and the local folder behind it, local or through a pyarrow SubTreeFileSystem."""
    if request.param == "local":
        return ArtifactStore(tmp_path / "store"), tmp_path / "store"
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    return ArtifactStore("store", filesystem=fs), tmp_path / "bucket" / "store"


def make_leftovers(root: Path, age_s: float, tag: str) -> list[Path]:
    """What killed writers leave: a staging folder, heartbeat and record temp files, a lock
    moved aside; all ``age_s`` old."""
    hexa = uuid.uuid4().hex
    paths = [
        root / "_tmp" / f"{tag}-0123456789abcdef-{hexa}",
        root / "_locks" / f".{tag}-0123456789abcdef.lock.{hexa}.tmp",
        root / "_locks" / f"{tag}-0123456789abcdef.stale-{hexa}",
        root / "_records" / "mirror" / "exp" / f".{tag}.json.{hexa}.tmp",
    ]
    (paths[0] / "tables").mkdir(parents=True)
    (paths[0] / "tables" / "logits.parquet").write_bytes(b"PAR1")
    for p in paths[1:]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{")
    for p in paths:
        set_age(p, age_s)
    return paths


def test_put_sweeps_old_leftovers_and_keeps_young_ones(store_root, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_LT_LOCK_STALE_S", raising=False)  # 120 s
    store, root = store_root
    old = make_leftovers(root, 1000, "old")
    young = make_leftovers(root, 30, "young")
    keep = root / "_records" / "mirror" / "exp" / "trial.json"
    keep.write_text("{}")
    set_age(keep, 1000)  # a record, however old, is not a leftover
    store.put(KEY, make_stage_dir(tmp_path / "out"))
    assert [p for p in old if p.exists()] == []
    assert all(p.exists() for p in [*young, keep])
    store.sweep(older_than_s=20)
    assert not any(p.exists() for p in young) and keep.exists()
    assert store.keys() == [KEY] and store.records("mirror") == {"mirror/exp/trial.json": {}}


def test_staging_folder_of_a_lock_holder_is_kept(store_root):
    store, root = store_root
    clock = FakeClock()
    (folder,) = make_leftovers(root, 1000, "teacher")[:1]
    holder = store.lock(KEY, "uploader", stale_after_s=600, heartbeat_s=300, clock=clock)
    clock.advance(-2000)  # took the lock before its last write: may still be uploading
    assert holder.acquire(timeout_s=0)
    assert str(folder.relative_to(root)) not in " ".join(store.sweep(older_than_s=120))
    assert folder.exists()
    holder.release()
    clock.advance(1500)  # a holder since after the last write: the folder is a leftover
    assert holder.acquire(timeout_s=0)
    assert store.sweep(older_than_s=120) and not folder.exists()
    holder.release()


def test_breaking_a_lock_sweeps_old_leftovers(tmp_path):
    old = make_leftovers(tmp_path, 1000, "student")
    young = make_leftovers(tmp_path, 5, "other")
    write_lock(tmp_path, heartbeat_at=time.time() - 1000)
    waiter = ArtifactStore(tmp_path).lock(KEY, "waiter", stale_after_s=600, heartbeat_s=300)
    assert waiter.acquire(timeout_s=0)
    waiter.release()
    assert [p for p in old if p.exists()] == [] and all(p.exists() for p in young)


def test_download_leftovers_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_LT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_LT_LOCK_STALE_S", raising=False)
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    store = ArtifactStore("prefix", filesystem=fs)
    store.put(KEY, make_stage_dir(tmp_path / "out"))
    old, young = (tmp_path / "cache" / f".{KEY}-{uuid.uuid4().hex}" for _ in range(2))
    for folder, age in ((old, 1000), (young, 30)):
        (folder / "tables").mkdir(parents=True)
        (folder / "tables" / "logits.parquet").write_bytes(b"PAR1")
        set_age(folder, age)
    assert Path(store.local_dir(KEY)) == tmp_path / "cache" / KEY
    assert not old.exists() and young.exists()
