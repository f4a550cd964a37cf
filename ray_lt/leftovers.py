"""What killed writers leave in the artifact store, and its removal.

A writer killed mid-way (SIGKILL, a lost node) cannot clean up: it leaves a staging folder in
``_tmp``, temporary files of atomic writes in ``_locks`` and ``_records``, or a lock it had moved
aside while breaking it. None of these is ever read as data, but they would pile up; this sweep
removes each once it is older than the lock stale interval, so nothing outlives its writer by
more than that. Anything still in use is younger, or (a staging folder) claimed by a lock.
"""

from __future__ import annotations

import contextlib
import json
import math

from ray_lt.locks import SIDE_FILE_RE, lock_path
from ray_lt.store_layout import LOCKS_DIR, NAME_RE, RECORDS_DIR, TMP_DIR
from ray_lt.storefs import TEMP_FILE_RE, Entry, StoreFS


def sweep_leftovers(fs: StoreFS, cutoff: float) -> list[str]:
    """Remove leftovers last written before ``cutoff`` (a wall time); the removed paths.

    Raises OSError if a folder cannot be listed (the store logs it and goes on).
    """
    return _sweep_files(fs, cutoff) + _sweep_tmp_folders(fs, cutoff)


def _mtime(entry: Entry) -> float:
    """A file's mtime; an undated one counts as new, so it is never taken for a leftover."""
    return math.inf if entry.mtime is None else entry.mtime


def _sweep_files(fs: StoreFS, cutoff: float) -> list[str]:
    """Delete old temporary and moved-aside files (a live writer's are seconds old)."""
    found = [
        e
        for e in fs.entries(fs.path(RECORDS_DIR), recursive=True)
        if TEMP_FILE_RE.fullmatch(e.name)
    ]
    found += [
        e
        for e in fs.entries(fs.path(LOCKS_DIR))
        if TEMP_FILE_RE.fullmatch(e.name) or SIDE_FILE_RE.fullmatch(e.name)
    ]
    removed = []
    for entry in found:
        if entry.is_file and _mtime(entry) < cutoff:
            with contextlib.suppress(FileNotFoundError):
                fs.remove_file(entry.path)
                removed.append(entry.path)
    return removed


def _sweep_tmp_folders(fs: StoreFS, cutoff: float) -> list[str]:
    """Remove ``_tmp`` folders whose newest entry is older than ``cutoff`` and unclaimed."""
    base = fs.path(TMP_DIR).rstrip("/") + "/"
    newest: dict[str, float] = {}
    for entry in fs.entries(fs.path(TMP_DIR), recursive=True):
        top, sep, _ = entry.path[len(base) :].partition("/")
        if not sep and not entry.is_dir:
            newest[top] = math.inf  # a stray file, not a staging folder: left alone
        elif entry.mtime is not None or entry.is_file:
            newest[top] = max(newest.get(top, -math.inf), _mtime(entry))
    removed = []
    for name, last in sorted(newest.items()):
        if last < cutoff and _unclaimed(fs, name, last):
            fs.remove_tree(base + name)
            removed.append(base + name)
    return removed


def _unclaimed(fs: StoreFS, name: str, last_write: float) -> bool:
    """True unless the key of ``_tmp/<key>-<uuid>`` is locked by a holder that took the lock
    before ``last_write`` (that holder may still be uploading it)."""
    key = name.rpartition("-")[0]
    if not NAME_RE.match(key):
        return True
    raw = fs.read_bytes(lock_path(fs, key))
    if raw is None:
        return True
    try:
        return float(json.loads(raw)["acquired_at"]) > last_write
    except (ValueError, KeyError, TypeError):
        return False
