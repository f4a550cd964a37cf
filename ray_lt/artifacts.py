"""Content-addressed stage artifacts: a store, whole-or-absent publishing and per-key locks.

A stage's output is found by its key (a hash of kind, config, input keys and code version), never
by a directory name, so a teacher that four students need is trained once, across trials and
sweeps. This module must never leave a half artifact that looks complete, never delete a stored
artifact (a corrupt one is moved to ``_quarantine`` and retrained) and never unpickle anything.
It works on a local folder or any ``pyarrow.fs`` URI; it knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_lt.errors import ArtifactError, ConfigError, CorruptArtifactError
from ray_lt.locks import Clock, StageLock

STORE_LAYOUT_VERSION = "1"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TEMP_FILE_RE = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # _write_bytes, write_json_atomic
_SIDE_FILE_RE = re.compile(r".+\.stale-[0-9a-f]{32}")  # a lock moved aside while being broken
log = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_json(value: Any, where: str, kind: str) -> None:
    """Raise ConfigError naming the first value under ``where`` that JSON cannot hold exactly."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"stage {kind!r}: config {where or 'root'} has key {k!r}; use str keys only"
                )
            _check_json(v, f"{where}.{k}" if where else k, kind)
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", kind)
        return
    raise ConfigError(
        f"stage {kind!r}: config key {where!r} holds {type(value).__name__} {value!r:.60}, which "
        "is not JSON-serialisable; use str, int, float, bool, None, list or dict"
    )


def stage_key(
    kind: str, config: Mapping[str, Any], input_keys: Mapping[str, str], code_version: str
) -> str:
    """Return the content key of a stage: ``<kind>-<16 hex digits of sha256>``.

    Args:
        kind: registry name of the stage objective (letters, digits, ``_.-``).
        config: the stage's hyperparameters; plain JSON values only (dict order is irrelevant).
        input_keys: upstream input name -> that stage's key.
        code_version: version of the stage code; bump it to invalidate stored artifacts.
    """
    if not isinstance(kind, str) or not _KEY_RE.match(kind):
        raise ConfigError(f"stage kind {kind!r} is not a valid name; use letters, digits, _ . -")
    _check_json(dict(config), "", kind)
    for name, key in input_keys.items():
        if not isinstance(name, str) or not isinstance(key, str):
            raise ConfigError(f"stage {kind!r}: input {name!r} -> {key!r} must map str to str key")
    if not isinstance(code_version, str):
        raise ConfigError(f"stage {kind!r}: code_version {code_version!r} must be a str")
    payload = {
        "kind": kind,
        "config": config,
        "inputs": dict(input_keys),
        "code_version": code_version,
        "layout": STORE_LAYOUT_VERSION,
    }
    # json writes floats with float.__repr__, the shortest exact round-trip form.
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to a local file so readers see the old file or the new, never half.

    Args:
        path: local file path; its folder is created if missing.
        obj: a JSON-serialisable value.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    """Read a JSON file from a pyarrow filesystem; a missing or malformed file -> ArtifactError.

    Args:
        fs: the filesystem holding ``path``.
        path: the file's path inside ``fs``.
    """
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {_one_line(exc)}; check the store") from exc
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({_one_line(exc)})") from exc


def _stale_s() -> float:
    """The lock stale interval: also how old a temporary file must be to count as a leftover."""
    return _env_seconds("RAY_LT_LOCK_STALE_S", 120.0)


def _env_seconds(name: str, default: float) -> float:
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


class ArtifactStore:
    """Stage artifacts under one root: ``<root>/<key>/`` plus ``_tmp``, ``_quarantine``,
    ``_locks``, ``_train``, ``_tune`` and ``_records``.

    Args:
        uri: a local folder (relative paths are made absolute), ``file://...`` or any
            ``pyarrow.fs`` URI such as ``s3://bucket/prefix``.
        filesystem: optional pyarrow filesystem; then ``uri`` is the root path inside it.
    """

    def __init__(self, uri: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None):
        text = os.fspath(uri)
        try:
            if filesystem is not None:
                fs, root = filesystem, text.rstrip("/")
            elif "://" in text:
                fs, root = pafs.FileSystem.from_uri(text)
            else:
                fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
            self._local = isinstance(fs, pafs.LocalFileSystem)
            if self._local:
                root = os.path.abspath(root)
                os.makedirs(root, exist_ok=True)
            else:
                fs.create_dir(root, recursive=True)
        except (OSError, ValueError, pyarrow.ArrowException) as exc:
            raise ArtifactError(
                f"cannot open artifact store {text!r}: {_one_line(exc)}; use a writable local "
                "folder or a pyarrow.fs URI such as s3://bucket/prefix"
            ) from exc
        self.fs: pafs.FileSystem = fs
        self.root: str = root
        self.uri: str = root if self._local else text.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    # -- paths -------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _child_uri(self, name: str) -> str:
        if self._local:
            return self._path(name)
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{name}{sep}{query}"

    def _key_dir(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ArtifactError(f"artifact key {key!r} is invalid; keys come from stage_key()")
        return self._path(key)

    # -- filesystem primitives (os calls on local disks, pyarrow elsewhere) ------------------

    def _read_bytes(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except OSError:
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            raise

    def _write_bytes(self, path: str, data: bytes) -> None:
        if self._local:
            folder, name = os.path.split(path)
            tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # object stores make a whole object visible at once
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def _list_files(self, folder: str) -> dict[str, int]:
        sel = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
        prefix = folder.rstrip("/") + "/"
        return {
            info.path[len(prefix) :]: info.size
            for info in self.fs.get_file_info(sel)
            if info.type == pafs.FileType.File
        }

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _move_tree(self, src: str, dst: str) -> bool:
        """Move a folder (False if ``src`` vanished); object stores copy each file, then delete."""
        if self._local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                return False
            return True
        files = self._list_files(src)
        if not files:
            return False
        for rel in sorted(files, key=lambda r: r == MANIFEST):  # manifest last
            self.fs.create_dir(f"{dst}/{rel}".rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(f"{src}/{rel}", f"{dst}/{rel}")
        self.fs.delete_dir(src)
        return True

    def _remove_tree(self, path: str) -> None:
        """Remove one of our own temporary folders (never a published artifact)."""
        if self._local:
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.fs.delete_dir(path)

    # -- checking ----------------------------------------------------------------------------

    def _check(self, key: str, verify: bool) -> tuple[str, str]:
        """Return (status, what is wrong); status is ok, absent, incomplete or corrupt."""
        folder = self._key_dir(key)
        raw = self._read_bytes(f"{folder}/{MANIFEST}")
        if raw is None:
            if self.fs.get_file_info(folder).type == pafs.FileType.NotFound:
                return "absent", ""
            return "incomplete", f"{MANIFEST} is missing"
        try:
            listed = json.loads(raw)["files"]
            expected = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in listed.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return "corrupt", f"{MANIFEST} is unreadable ({_one_line(exc)})"
        if not verify:
            return "ok", ""
        actual = self._list_files(folder)
        actual.pop(MANIFEST, None)
        for rel in sorted(set(expected) - set(actual)):
            return "corrupt", f"{rel} is missing"
        for rel in sorted(set(actual) - set(expected)):
            return "corrupt", f"{rel} is not in the manifest"
        for rel, (size, sha) in sorted(expected.items()):
            if actual[rel] != size:
                return "corrupt", f"{rel} has {actual[rel]} bytes, expected {size}"
            if self._sha256(f"{folder}/{rel}") != sha:
                return "corrupt", f"{rel} fails its sha256 check"
        return "ok", ""

    def _quarantine(self, key: str) -> str:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dst = self._path("_quarantine", f"{key}-{stamp}")
        if self.fs.get_file_info(dst).type != pafs.FileType.NotFound:
            dst = f"{dst}-{uuid.uuid4().hex[:8]}"
        self._move_tree(self._key_dir(key), dst)
        return dst

    # -- public API --------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        """True if ``key`` has a readable manifest (a complete artifact); no checksums."""
        return self._check(key, verify=False)[0] == "ok"

    def open(self, key: str, verify: bool = True) -> Artifact:
        """Return artifact ``key``; with ``verify`` every file is checked against the manifest.

        Args:
            key: the stage key.
            verify: check sizes and sha256 of every file (a corrupt artifact is quarantined).
        """
        status, detail = self._check(key, verify)
        if status == "ok":
            return Artifact(key=key, uri=self._child_uri(key), store=self)
        if status == "absent":
            raise ArtifactError(f"no artifact {key!r} in {self.uri}; run its stage to create it")
        if status == "incomplete":
            raise ArtifactError(
                f"artifact {key!r} in {self.uri} is incomplete ({detail}); a writer crashed or is "
                "still publishing it; run its stage again to replace it"
            )
        moved = self._quarantine(key)
        raise CorruptArtifactError(
            f"artifact {key!r} in {self.uri} is corrupt: {detail}; moved to {moved}, "
            "it will be retrained"
        )

    def lookup(self, key: str) -> Artifact | None:
        """Return the valid artifact ``key``, or None if it is absent, incomplete or corrupt
        (a corrupt one is quarantined with a warning, so the caller retrains it)."""
        try:
            return self.open(key)
        except CorruptArtifactError as exc:
            log.warning("%s", exc)
        except ArtifactError:
            pass
        return None

    def put(self, key: str, local_dir: str | os.PathLike) -> Artifact:
        """Publish a local folder as artifact ``key``, whole or not at all.

        Files go to ``_tmp/<key>-<uuid>/``, the manifest is written last, then the folder is
        renamed to ``<key>`` (atomic on local disks; copy + delete, manifest last, elsewhere).
        If a valid ``key`` already exists (a concurrent writer won) it is returned instead; a
        corrupt or manifest-less one is quarantined first. On object stores hold the key's lock:
        a ``<key>`` still being copied there looks manifest-less. Each put first sweeps the
        leftovers of killed writers (``sweep``), a few listings next to a whole upload.

        Args:
            key: the stage key.
            local_dir: local folder with model.safetensors, tables/, metrics.json, spec.json.
        """
        src = os.fspath(local_dir)
        final = self._key_dir(key)
        if not os.path.isdir(src):
            raise ArtifactError(f"cannot store {key!r}: {src!r} is not a folder; write it first")
        existing = self._existing(key)
        if existing is not None:
            return existing
        self.sweep()
        tmp = self._path("_tmp", f"{key}-{uuid.uuid4().hex}")
        try:
            self._upload(src, tmp)
            for _ in range(3):
                if self._local:
                    try:
                        os.rename(tmp, final)
                        return Artifact(key=key, uri=self._child_uri(key), store=self)
                    except OSError:  # final exists: a concurrent writer or a leftover
                        pass
                elif self.fs.get_file_info(final).type == pafs.FileType.NotFound:
                    self._move_tree(tmp, final)
                    return self.open(key, verify=False)
                existing = self._existing(key)
                if existing is not None:
                    return existing
            raise ArtifactError(f"cannot publish {key!r} at {final}; check the store permissions")
        finally:
            self._remove_tree(tmp)

    def _existing(self, key: str) -> Artifact | None:
        """The valid artifact ``key`` or None; anything else found there is quarantined."""
        status, detail = self._check(key, verify=True)
        if status == "ok":
            return Artifact(key=key, uri=self._child_uri(key), store=self)
        if status != "absent":
            moved = self._quarantine(key)
            log.warning("artifact %r was %s (%s); moved to %s", key, status, detail, moved)
        return None

    def _upload(self, src: str, dst: str) -> None:
        """Copy ``src`` to ``dst`` hashing as it goes, then write the manifest last."""
        files: dict[str, dict[str, Any]] = {}
        for folder, _, names in os.walk(src):
            for name in sorted(names):
                rel = os.path.relpath(os.path.join(folder, name), src).replace(os.sep, "/")
                if rel == MANIFEST:
                    continue
                target = f"{dst}/{rel}"
                digest, size = hashlib.sha256(), 0
                if self._local:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    out = open(target, "wb")  # closed by the with below, after fsync
                else:
                    self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                    out = self.fs.open_output_stream(target)
                with open(os.path.join(folder, name), "rb") as inp, out:
                    while chunk := inp.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                    if self._local:
                        out.flush()
                        os.fsync(out.fileno())
                files[rel] = {"sha256": digest.hexdigest(), "size": size}
        if self._local:
            os.makedirs(dst, exist_ok=True)
        manifest = {"layout": STORE_LAYOUT_VERSION, "files": files}
        self._write_bytes(f"{dst}/{MANIFEST}", json.dumps(manifest, indent=1).encode())

    def keys(self) -> list[str]:
        """Sorted keys of complete artifacts; names starting with ``_`` are the store's own."""
        sel = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        names = [
            info.base_name
            for info in self.fs.get_file_info(sel)
            if info.type == pafs.FileType.Directory and _KEY_RE.match(info.base_name)
        ]
        return sorted(n for n in names if self.contains(n))

    def lock(
        self,
        key: str,
        owner: str,
        *,
        stale_after_s: float | None = None,
        heartbeat_s: float | None = None,
        clock: Clock | None = None,
    ) -> StageLock:
        """Return the (not yet acquired) lease lock of ``key``.

        Args:
            key: the stage key.
            owner: who holds it (a trial id), written into the lock file.
            stale_after_s: a lock whose heartbeat is older is broken (env RAY_LT_LOCK_STALE_S,
                default 120).
            heartbeat_s: how often the holder refreshes it (env RAY_LT_LOCK_HEARTBEAT_S,
                default 10).
            clock: wall time, sleeping and waiting (tests pass a fake one; default real time).
        """
        self._key_dir(key)
        stale = _stale_s() if stale_after_s is None else stale_after_s
        beat = (
            _env_seconds("RAY_LT_LOCK_HEARTBEAT_S", 10.0) if heartbeat_s is None else heartbeat_s
        )
        if not 0 < beat < stale:
            raise ConfigError(
                f"lock heartbeat {beat} s must be positive and shorter than stale_after {stale} s;"
                " lower RAY_LT_LOCK_HEARTBEAT_S or raise RAY_LT_LOCK_STALE_S"
            )
        return StageLock(self, key, owner, stale_after_s=stale, heartbeat_s=beat, clock=clock)

    # -- leftovers of killed writers -----------------------------------------------------------

    def sweep(self, older_than_s: float | None = None, *, now: float | None = None) -> list[str]:
        """Remove what killed writers left, so no temporary file outlives its writer by more
        than the lock stale interval: ``.*.tmp`` files in ``_locks`` and ``_records``, locks
        moved aside by a killed breaker and ``_tmp/<key>-<uuid>`` folders. Only things older
        than ``older_than_s`` go; a ``_tmp`` folder only while nobody holds its key's lock since
        before its last write (a live uploader keeps its folder). Best effort: errors are
        logged, never raised.

        Args:
            older_than_s: minimum age in seconds (default: env RAY_LT_LOCK_STALE_S, 120).
            now: the current wall time (default ``time.time()``; locks pass their clock's).

        Returns:
            The removed paths.
        """
        age = _stale_s() if older_than_s is None else older_than_s
        cutoff = (time.time() if now is None else now) - age
        try:
            return self._sweep_files(cutoff) + self._sweep_tmp_folders(cutoff)
        except OSError as exc:
            log.warning("cannot sweep leftovers in %s: %s", self.uri, _one_line(exc))
            return []

    def _infos(self, folder: str, recursive: bool) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self._path(folder), recursive=recursive, allow_not_found=True)
        return self.fs.get_file_info(sel)

    def _sweep_files(self, cutoff: float) -> list[str]:
        """Delete old temporary and moved-aside files (a live writer's are seconds old)."""
        found = [
            i
            for i in self._infos("_records", recursive=True)
            if _TEMP_FILE_RE.fullmatch(i.base_name)
        ]
        found += [
            i
            for i in self._infos("_locks", recursive=False)
            if _TEMP_FILE_RE.fullmatch(i.base_name) or _SIDE_FILE_RE.fullmatch(i.base_name)
        ]
        removed = []
        for info in found:
            if info.type == pafs.FileType.File and _mtime(info) < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(info.path)
                    removed.append(info.path)
        return removed

    def _sweep_tmp_folders(self, cutoff: float) -> list[str]:
        """Remove ``_tmp`` folders whose newest entry is older than ``cutoff`` and unclaimed."""
        base = self._path("_tmp").rstrip("/") + "/"
        newest: dict[str, float] = {}
        for info in self._infos("_tmp", recursive=True):
            top, sep, _ = info.path[len(base) :].partition("/")
            if not sep and info.type != pafs.FileType.Directory:
                newest[top] = math.inf  # a stray file, not a staging folder: left alone
            elif info.mtime is not None or info.type == pafs.FileType.File:
                newest[top] = max(newest.get(top, -math.inf), _mtime(info))
        removed = []
        for name, last in sorted(newest.items()):
            if last < cutoff and self._unclaimed(name, last):
                self._remove_tree(base + name)
                removed.append(base + name)
        return removed

    def _unclaimed(self, name: str, last_write: float) -> bool:
        """True unless the key of ``_tmp/<key>-<uuid>`` is locked by a holder that took the lock
        before ``last_write`` (that holder may still be uploading it)."""
        key = name.rpartition("-")[0]
        if not _KEY_RE.match(key):
            return True
        raw = self._read_bytes(self._path("_locks", f"{key}.lock"))
        if raw is None:
            return True
        try:
            return float(json.loads(raw)["acquired_at"]) > last_write
        except (ValueError, KeyError, TypeError):
            return False

    def local_dir(self, key: str) -> str:
        """A local folder with the artifact's files: the store folder itself for local stores,
        else a verified download into ``$RAY_LT_CACHE/<key>`` (~/.cache/ray_lt/artifacts)."""
        if not self.contains(key):
            self.open(key, verify=False)  # raises the precise error
        if self._local:
            return self._key_dir(key)
        raw = self._read_bytes(f"{self._key_dir(key)}/{MANIFEST}") or b"{}"
        listed = json.loads(raw).get("files", {})
        cache = os.environ.get("RAY_LT_CACHE") or os.path.expanduser("~/.cache/ray_lt/artifacts")
        dest = os.path.join(cache, key)
        if _local_matches(dest, listed):
            return dest
        _sweep_downloads(cache, key, time.time() - _stale_s())
        tmp = os.path.join(cache, f".{key}-{uuid.uuid4().hex}")
        try:
            for rel in listed:
                target = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as out:
                    with self.fs.open_input_stream(f"{self._key_dir(key)}/{rel}") as inp:
                        while chunk := inp.read(_CHUNK):
                            out.write(chunk)
            if not _local_matches(tmp, listed):
                self.open(key)  # a corrupt store copy is quarantined and raises
                raise ArtifactError(f"artifact {key!r} changed while downloading; try again")
            with open(os.path.join(tmp, MANIFEST), "wb") as f:
                f.write(raw)
            for _ in range(3):
                try:
                    os.rename(tmp, dest)
                    return dest
                except OSError:
                    if _local_matches(dest, listed):
                        return dest
                    shutil.rmtree(dest, ignore_errors=True)  # a stale cache copy, not the store
            raise ArtifactError(f"cannot place {key!r} in cache {dest}; set RAY_LT_CACHE")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- small JSON records of the harness itself (e.g. the MLflow outbox), never artifacts ---

    def _record_path(self, name: str) -> str:
        parts = name.split("/")
        if not all(_KEY_RE.match(p) for p in parts) or not name.endswith(".json"):
            raise ArtifactError(f"record name {name!r} is invalid; use a/b.json of safe names")
        return self._path("_records", *parts)

    def write_record(self, name: str, obj: Any) -> None:
        """Write ``_records/<name>`` whole (readers see the old record or the new, never half).

        Args:
            name: relative name such as ``mirror/<experiment>/<trial>.json``.
            obj: a JSON-serialisable value.
        """
        path = self._record_path(name)
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    def records(self, folder: str) -> dict[str, Any]:
        """Every readable record under ``_records/<folder>``, by name; half-written temporary
        files and unreadable records are skipped (a record is plain JSON, never unpickled)."""
        base = self._path("_records", *folder.strip("/").split("/"))
        out = {}
        for rel in sorted(self._list_files(base)):
            if rel.endswith(".json") and not posixpath.basename(rel).startswith("."):
                raw = self._read_bytes(f"{base}/{rel}")
                try:
                    out[f"{folder.strip('/')}/{rel}"] = json.loads(raw or b"")
                except ValueError:
                    log.warning("skipping unreadable record %s/%s", base, rel)
        return out

    def remove_record(self, name: str) -> None:
        """Delete one record (a missing one is fine)."""
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(self._record_path(name))

    def train_dir(self) -> str:
        """``<root>/_train`` for Ray Train's ``storage_path`` (a local path or a URI)."""
        if self._local:
            os.makedirs(self._path("_train"), exist_ok=True)
        return self._child_uri("_train")


def _sweep_downloads(cache: str, key: str, cutoff: float) -> None:
    """Remove ``.<key>-<uuid>`` download folders of killed readers whose newest entry is older
    than ``cutoff`` (a live download keeps writing, so its files stay new)."""
    name = re.compile(re.escape(f".{key}-") + r"[0-9a-f]{32}")
    with contextlib.suppress(OSError):
        for entry in os.scandir(cache):
            if name.fullmatch(entry.name) and entry.is_dir() and _newest(entry.path) < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)


def _newest(folder: str) -> float:
    """The newest mtime of a local folder and everything in it."""
    newest = os.stat(folder).st_mtime
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(os.path.join(parent, name)).st_mtime)
    return newest


def _mtime(info: pafs.FileInfo) -> float:
    """A file's mtime; an undated one counts as new, so it is never taken for a leftover."""
    return math.inf if info.mtime is None else info.mtime.timestamp()


def _local_matches(folder: str, listed: Mapping[str, Mapping[str, Any]]) -> bool:
    """True if a local folder holds exactly the manifest's files with their sizes and sha256."""
    if not os.path.isdir(folder):
        return False
    fs = pafs.LocalFileSystem()
    prefix = os.path.abspath(folder)
    sel = pafs.FileSelector(prefix, recursive=True)
    actual = {
        i.path[len(prefix) + 1 :]: i.size
        for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File
    }
    actual.pop(MANIFEST, None)
    if actual != {rel: e["size"] for rel, e in listed.items()}:
        return False
    for rel, entry in listed.items():
        digest = hashlib.sha256()
        with open(os.path.join(prefix, *rel.split("/")), "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            return False
    return True


@dataclass(frozen=True)
class Artifact:
    """A complete stored stage output; read it through these methods, never by path guessing."""

    key: str
    uri: str
    store: ArtifactStore

    @property
    def _dir(self) -> str:
        return self.store._path(self.key)

    def _read(self, rel: str, what: str) -> bytes:
        raw = self.store._read_bytes(f"{self._dir}/{rel}")
        if raw is None:
            raise ArtifactError(f"artifact {self.key!r} has no {rel} ({what}); re-run its stage")
        return raw

    def spec(self) -> dict:
        """The stage spec, versions and git commit (``spec.json``)."""
        return json.loads(self._read("spec.json", "stage spec"))

    def metrics(self) -> dict:
        """The stage's final metrics (``metrics.json``)."""
        return json.loads(self._read("metrics.json", "metrics"))

    def files(self) -> list[str]:
        """Relative paths of every file, from the manifest."""
        return sorted(json.loads(self._read(MANIFEST, "manifest"))["files"])

    def table(self, name: str) -> pyarrow.Table:
        """Read ``tables/<name>.parquet``.

        Args:
            name: table name without folder or suffix, e.g. ``"logits"``.
        """
        files = self.files()
        if f"tables/{name}.parquet" not in files:
            known = [f[7:-8] for f in files if f.startswith("tables/") and f.endswith(".parquet")]
            raise ArtifactError(f"artifact {self.key!r} has no table {name!r}; it has {known}")
        return pq.read_table(f"{self._dir}/tables/{name}.parquet", filesystem=self.store.fs)

    def state_dict(self, name: str = "model") -> dict:
        """Load ``<name>.safetensors`` as a dict of tensors (never pickle).

        Args:
            name: weights file name without suffix.
        """
        from safetensors.torch import load  # lazy: torch is heavy and not needed to find keys

        files = self.files()
        if f"{name}.safetensors" not in files:
            known = [f[:-12] for f in files if f.endswith(".safetensors")]
            raise ArtifactError(f"artifact {self.key!r} has no weights {name!r}; it has {known}")
        return load(self._read(f"{name}.safetensors", "weights"))

    def local_dir(self) -> str:
        """A local folder with the artifact's files (downloaded for remote stores)."""
        return self.store.local_dir(self.key)
