"""Small JSON records of the harness itself in the artifact store (e.g. the MLflow outbox).

Records live in ``<root>/_records``, beside the artifacts but never among them: they are plain
JSON, written whole, read back skipping anything half-written or unreadable, never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from typing import Any

from ray_lt.errors import ArtifactError
from ray_lt.store_layout import NAME_RE, RECORDS_DIR
from ray_lt.storefs import StoreFS

log = logging.getLogger("ray_lt.artifacts")  # where these warnings were always logged


class RecordOutbox:
    """The records under ``<root>/_records`` of one store.

    Args:
        fs: the store's file system.
    """

    def __init__(self, fs: StoreFS) -> None:
        self.fs = fs

    def _path(self, name: str) -> str:
        """The path of record ``name``; a name that could leave ``_records`` is refused."""
        parts = name.split("/")
        if not all(NAME_RE.match(p) for p in parts) or not name.endswith(".json"):
            raise ArtifactError(f"record name {name!r} is invalid; use a/b.json of safe names")
        return self.fs.path(RECORDS_DIR, *parts)

    def write(self, name: str, obj: Any) -> None:
        """Write record ``name`` whole (readers see the old record or the new, never half).

        Args:
            name: relative name such as ``mirror/<experiment>/<trial>.json``.
            obj: a JSON-serialisable value.
        """
        path = self._path(name)
        self.fs.makedirs(posixpath.dirname(path))
        self.fs.write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_all(self, folder: str) -> dict[str, Any]:
        """Every readable record under ``folder``, by name; half-written temporary files and
        unreadable records are skipped."""
        base = self.fs.path(RECORDS_DIR, *folder.strip("/").split("/"))
        out = {}
        for rel in sorted(self.fs.list_files(base)):
            if rel.endswith(".json") and not posixpath.basename(rel).startswith("."):
                raw = self.fs.read_bytes(f"{base}/{rel}")
                try:
                    out[f"{folder.strip('/')}/{rel}"] = json.loads(raw or b"")
                except ValueError:
                    log.warning("skipping unreadable record %s/%s", base, rel)
        return out

    def remove(self, name: str) -> None:
        """Delete record ``name`` (a missing one is fine)."""
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.remove_file(self._path(name))
