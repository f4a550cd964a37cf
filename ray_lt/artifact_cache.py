"""A verified local copy of a remote artifact, for code that needs plain local files.

Readers of a remote store (e.g. code that opens weights with a local path) get the artifact's
files downloaded into ``$RAY_LT_CACHE/<key>`` (default ``~/.cache/ray_lt/artifacts``). A copy is
used only while it matches the manifest (sizes and sha256), so a damaged or stale cache copy is
downloaded again; a download goes to a private temporary folder and is renamed into place, so
concurrent readers never see half a copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow.fs as pafs

from ray_lt.errors import ArtifactError
from ray_lt.locks import stale_s
from ray_lt.store_layout import MANIFEST
from ray_lt.storefs import StoreFS

_CHUNK = 1 << 20


def cache_root() -> str:
    """Where downloaded artifacts are kept: ``$RAY_LT_CACHE`` or ``~/.cache/ray_lt/artifacts``."""
    return os.environ.get("RAY_LT_CACHE") or os.path.expanduser("~/.cache/ray_lt/artifacts")


def cached_copy(
    fs: StoreFS, folder: str, key: str, manifest: bytes, recheck: Callable[[], object]
) -> str:
    """A local folder matching the artifact at ``folder``: the cached copy, downloaded if needed.

    Args:
        fs: the store's file system.
        folder: the artifact's folder in the store.
        key: the artifact's key (the cache folder's name).
        manifest: the artifact's manifest as stored.
        recheck: verifies the stored artifact when a download does not match its manifest (it
            quarantines a corrupt one and raises); if it returns, the artifact changed meanwhile.
    """
    listed = json.loads(manifest).get("files", {})
    cache = cache_root()
    dest = os.path.join(cache, key)
    if _local_matches(dest, listed):
        return dest
    _sweep_downloads(cache, key, time.time() - stale_s())
    tmp = os.path.join(cache, f".{key}-{uuid.uuid4().hex}")
    try:
        _download(fs, folder, listed, tmp)
        if not _local_matches(tmp, listed):
            recheck()
            raise ArtifactError(f"artifact {key!r} changed while downloading; try again")
        with open(os.path.join(tmp, MANIFEST), "wb") as f:
            f.write(manifest)
        return _place(tmp, dest, listed, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(fs: StoreFS, folder: str, listed: Mapping[str, Any], tmp: str) -> None:
    """Copy every file the manifest lists from the store folder into local folder ``tmp``."""
    for rel in listed:
        target = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            with fs.open_read(f"{folder}/{rel}") as inp:
                while chunk := inp.read(_CHUNK):
                    out.write(chunk)


def _place(tmp: str, dest: str, listed: Mapping[str, Any], key: str) -> str:
    """Rename the download into place; a concurrent reader's matching copy there is kept."""
    for _ in range(3):
        try:
            os.rename(tmp, dest)
            return dest
        except OSError:
            if _local_matches(dest, listed):
                return dest
            shutil.rmtree(dest, ignore_errors=True)  # a stale cache copy, not the store
    raise ArtifactError(f"cannot place {key!r} in cache {dest}; set RAY_LT_CACHE")


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
