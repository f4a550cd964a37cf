"""Content-addressed stage artifacts: a store and whole-or-absent publishing.

A stage's output is found by its key (a hash of kind, config, input keys and code version; see
``ray_lt.spec.stage_key``), never by a directory name, so a teacher that four students need is
trained once, across trials and sweeps. This module must never leave a half artifact that looks
complete, never delete a stored artifact (a corrupt one is moved to ``_quarantine`` and
retrained) and never unpickle anything. It works on a local folder or any ``pyarrow.fs`` URI
through ``ray_lt.storefs``; it knows nothing of Ray or MLflow. Its helpers: ``locks`` (per-key
lease locks), ``leftovers`` (what killed writers left), ``artifact_cache`` (verified downloads of
remote artifacts) and ``records`` (the harness's own JSON records).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_lt.artifact_cache import cached_copy
from ray_lt.errors import ArtifactError, CorruptArtifactError
from ray_lt.leftovers import sweep_leftovers
from ray_lt.locks import Clock, StageLock, lock_settings, stale_s
from ray_lt.records import RecordOutbox
from ray_lt.store_layout import (
    MANIFEST,
    NAME_RE,
    QUARANTINE_DIR,
    STORE_LAYOUT_VERSION,
    TMP_DIR,
    TRAIN_DIR,
)
from ray_lt.storefs import StoreFS, one_line, read_json, write_json_atomic

# Importable from here as before they moved (``stage_key`` too: see ``__getattr__``).
__all__ = ["MANIFEST", "STORE_LAYOUT_VERSION", "Artifact", "ArtifactStore"]
__all__ += ["read_json", "write_json_atomic"]
log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """Keep ``stage_key`` importable from here (it is computed in ``ray_lt.spec`` now), loaded on
    first use: the spec module imports torch, which opening a store must not need."""
    if name == "stage_key":
        from ray_lt.spec import stage_key

        return stage_key
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
            storefs = StoreFS(text, filesystem=filesystem)
        except (OSError, ValueError, pyarrow.ArrowException) as exc:
            raise ArtifactError(
                f"cannot open artifact store {text!r}: {one_line(exc)}; use a writable local "
                "folder or a pyarrow.fs URI such as s3://bucket/prefix"
            ) from exc
        self.storefs: StoreFS = storefs
        self.fs: pafs.FileSystem = storefs.fs
        self.root: str = storefs.root
        self.uri: str = storefs.uri
        self._records = RecordOutbox(storefs)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def _key_dir(self, key: str) -> str:
        """The folder of artifact ``key``; a key that could leave the root is refused."""
        if not isinstance(key, str) or not NAME_RE.match(key):
            raise ArtifactError(f"artifact key {key!r} is invalid; keys come from stage_key()")
        return self.storefs.path(key)

    def _artifact(self, key: str) -> Artifact:
        return Artifact(key=key, uri=self.storefs.child_uri(key), store=self)

    # -- checking ----------------------------------------------------------------------------

    def _check(self, key: str, verify: bool) -> tuple[str, str]:
        """Return (status, what is wrong); status is ok, absent, incomplete or corrupt."""
        folder = self._key_dir(key)
        raw = self.storefs.read_bytes(f"{folder}/{MANIFEST}")
        if raw is None:
            if not self.storefs.exists(folder):
                return "absent", ""
            return "incomplete", f"{MANIFEST} is missing"
        try:
            listed = json.loads(raw)["files"]
            expected = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in listed.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return "corrupt", f"{MANIFEST} is unreadable ({one_line(exc)})"
        if not verify:
            return "ok", ""
        problem = self._mismatch(folder, expected)
        return ("ok", "") if problem is None else ("corrupt", problem)

    def _mismatch(self, folder: str, expected: dict[str, tuple[int, str]]) -> str | None:
        """The first way the files in ``folder`` differ from the manifest's, or None."""
        actual = self.storefs.list_files(folder)
        actual.pop(MANIFEST, None)
        for rel in sorted(set(expected) - set(actual)):
            return f"{rel} is missing"
        for rel in sorted(set(actual) - set(expected)):
            return f"{rel} is not in the manifest"
        for rel, (size, sha) in sorted(expected.items()):
            if actual[rel] != size:
                return f"{rel} has {actual[rel]} bytes, expected {size}"
            if self.storefs.sha256(f"{folder}/{rel}") != sha:
                return f"{rel} fails its sha256 check"
        return None

    def _quarantine(self, key: str) -> str:
        """Move artifact ``key`` aside (never delete it: it may be looked at); its new path."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        dst = self.storefs.path(QUARANTINE_DIR, f"{key}-{stamp}")
        if self.storefs.exists(dst):
            dst = f"{dst}-{uuid.uuid4().hex[:8]}"
        self.storefs.move_tree(self._key_dir(key), dst, last=MANIFEST)
        return dst

    # -- reading -----------------------------------------------------------------------------

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
            return self._artifact(key)
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

    def keys(self) -> list[str]:
        """Sorted keys of complete artifacts; names starting with ``_`` are the store's own."""
        names = [
            e.name for e in self.storefs.entries(self.root) if e.is_dir and NAME_RE.match(e.name)
        ]
        return sorted(n for n in names if self.contains(n))

    def local_dir(self, key: str) -> str:
        """A local folder with the artifact's files: the store folder itself for local stores,
        else a verified download into ``$RAY_LT_CACHE/<key>`` (~/.cache/ray_lt/artifacts)."""
        if not self.contains(key):
            self.open(key, verify=False)  # raises the precise error
        folder = self._key_dir(key)
        in_place = self.storefs.local_path(folder)
        if in_place is not None:
            return in_place
        raw = self.storefs.read_bytes(f"{folder}/{MANIFEST}") or b"{}"
        return cached_copy(self.storefs, folder, key, raw, recheck=lambda: self.open(key))

    # -- publishing --------------------------------------------------------------------------

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
        tmp = self.storefs.path(TMP_DIR, f"{key}-{uuid.uuid4().hex}")
        try:
            self._upload(src, tmp)
            for _ in range(3):
                if self.storefs.move_tree_if_absent(tmp, final, last=MANIFEST):
                    return self.open(key, verify=False)  # on object stores: did the copy land?
                existing = self._existing(key)  # final exists: a concurrent writer or leftover
                if existing is not None:
                    return existing
            raise ArtifactError(f"cannot publish {key!r} at {final}; check the store permissions")
        finally:
            self.storefs.remove_tree(tmp)

    def _existing(self, key: str) -> Artifact | None:
        """The valid artifact ``key`` or None; anything else found there is quarantined."""
        status, detail = self._check(key, verify=True)
        if status == "ok":
            return self._artifact(key)
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
                if rel != MANIFEST:
                    sha, size = self.storefs.upload(os.path.join(folder, name), f"{dst}/{rel}")
                    files[rel] = {"sha256": sha, "size": size}
        self.storefs.makedirs(dst)  # an empty source still gets its folder locally
        manifest = {"layout": STORE_LAYOUT_VERSION, "files": files}
        self.storefs.write_bytes(f"{dst}/{MANIFEST}", json.dumps(manifest, indent=1).encode())

    # -- locks and leftovers -----------------------------------------------------------------

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
        stale, beat = lock_settings(stale_after_s, heartbeat_s)
        return StageLock(
            self.storefs,
            key,
            owner,
            stale_after_s=stale,
            heartbeat_s=beat,
            clock=clock,
            sweep=self.sweep,
        )

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
        age = stale_s() if older_than_s is None else older_than_s
        cutoff = (time.time() if now is None else now) - age
        try:
            return sweep_leftovers(self.storefs, cutoff)
        except OSError as exc:
            log.warning("cannot sweep leftovers in %s: %s", self.uri, one_line(exc))
            return []

    # -- the harness's own files: JSON records (e.g. the MLflow outbox), Ray Train's folder ---

    def write_record(self, name: str, obj: Any) -> None:
        """Write ``_records/<name>`` whole (readers see the old record or the new, never half).

        Args:
            name: relative name such as ``mirror/<experiment>/<trial>.json``.
            obj: a JSON-serialisable value.
        """
        self._records.write(name, obj)

    def records(self, folder: str) -> dict[str, Any]:
        """Every readable record under ``_records/<folder>``, by name; half-written temporary
        files and unreadable records are skipped (a record is plain JSON, never unpickled)."""
        return self._records.read_all(folder)

    def remove_record(self, name: str) -> None:
        """Delete one record (a missing one is fine)."""
        self._records.remove(name)

    def train_dir(self) -> str:
        """``<root>/_train`` for Ray Train's ``storage_path`` (a local path or a URI)."""
        self.storefs.makedirs(self.storefs.path(TRAIN_DIR))
        return self.storefs.child_uri(TRAIN_DIR)

    def drop_train_state(self, name: str) -> None:
        """Delete ``_train/<name>``, the resume state of a run whose stages are all published.

        Nothing resumes from it any more (a rerun reuses the published stages), it holds a model
        and its optimizer state (hundreds of MB for a ResNet-152), and a stage retrained after
        its artifact was removed or quarantined must start from scratch, not from the last
        epoch of the run that made the lost artifact.
        """
        self.storefs.remove_tree(self.storefs.path(TRAIN_DIR, name))


@dataclass(frozen=True)
class Artifact:
    """A complete stored stage output; read it through these methods, never by path guessing."""

    key: str
    uri: str
    store: ArtifactStore

    @property
    def _dir(self) -> str:
        return self.store.storefs.path(self.key)

    def _read(self, rel: str, what: str) -> bytes:
        raw = self.store.storefs.read_bytes(f"{self._dir}/{rel}")
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
