"""The store's file-system layer: every byte the artifact store and its locks read or write.

The store lives on a local folder or on any ``pyarrow.fs`` file system (S3, GCS, ...). The two
differ where it matters for correctness: a local disk has atomic renames, ``O_EXCL`` creates and
``fsync``, an object store makes a whole object visible at once but can only copy and delete.
This module is the only place that tells them apart, so that the store and its locks are written
once against ``StoreFS`` and stay correct on both. It knows nothing of artifacts or locks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from ray_lt.errors import ArtifactError

_CHUNK = 1 << 20
#: Temporary files of ``StoreFS.write_bytes`` and ``write_json_atomic``: ``.<name>.<uuid>.tmp``.
TEMP_FILE_RE = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


def one_line(exc: BaseException) -> str:
    """An exception as one line of text, for one-line error messages and warnings."""
    return " ".join(str(exc).split()) or type(exc).__name__


def temp_files_of(name: str) -> re.Pattern[str]:
    """The names of the temporary files an atomic write of file ``name`` may leave behind."""
    return re.compile(re.escape(f".{name}.") + r"[0-9a-f]{32}\.tmp")


def _temp_path(path: str) -> str:
    """A fresh temporary sibling of ``path``; its name matches ``TEMP_FILE_RE``."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")


def _write_synced(file: BinaryIO, data: bytes) -> None:
    """Write ``data`` and force it to disk, so a crash never leaves a renamed-but-empty file."""
    file.write(data)
    file.flush()
    os.fsync(file.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to a local file so readers see the old file or the new, never half.

    Args:
        path: local file path; its folder is created if missing.
        obj: a JSON-serialisable value.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_path(os.path.join(folder, os.path.basename(path)))
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
        raise ArtifactError(f"cannot read {path}: {one_line(exc)}; check the store") from exc
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({one_line(exc)})") from exc


@dataclass(frozen=True)
class Entry:
    """One listed file or folder; ``mtime`` is None where the file system keeps none."""

    path: str
    name: str
    is_file: bool
    is_dir: bool
    size: int | None
    mtime: float | None


def _entry(info: pafs.FileInfo) -> Entry:
    return Entry(
        path=info.path,
        name=info.base_name,
        is_file=info.type == pafs.FileType.File,
        is_dir=info.type == pafs.FileType.Directory,
        size=info.size,
        mtime=None if info.mtime is None else info.mtime.timestamp(),
    )


class StoreFS:
    """Files under one root, on a local folder or any pyarrow file system.

    Raises what opening the file system raises (OSError, ValueError, ``pyarrow.ArrowException``);
    the store turns that into one line naming the URI.

    Args:
        uri: a local folder (relative paths are made absolute), ``file://...`` or any
            ``pyarrow.fs`` URI such as ``s3://bucket/prefix``.
        filesystem: optional pyarrow filesystem; then ``uri`` is the root path inside it.
    """

    def __init__(self, uri: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None):
        text = os.fspath(uri)
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
        self.fs: pafs.FileSystem = fs
        self.root: str = root
        self.uri: str = root if self._local else text.rstrip("/")

    def __repr__(self) -> str:
        return f"StoreFS({self.uri!r})"

    # -- names -------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """``parts`` joined under the root: a path inside ``fs``."""
        return posixpath.join(self.root, *parts)

    def child_uri(self, name: str) -> str:
        """The URI of ``<root>/<name>`` for tools that take a URI (a plain path locally)."""
        if self._local:
            return self.path(name)
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{name}{sep}{query}"

    def local_path(self, path: str) -> str | None:
        """``path`` as an OS path when the store is a local folder (readers can open it in
        place), else None (its files must be downloaded first)."""
        return path if self._local else None

    # -- reading -----------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        """True if a file or folder is at ``path``."""
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def mtime(self, path: str) -> float | None:
        """The modification time of ``path``; None if it is absent or undated."""
        info = self.fs.get_file_info(path)
        return None if info.mtime is None else info.mtime.timestamp()

    def open_read(self, path: str) -> Any:
        """A binary input stream of file ``path`` (use it in a ``with``)."""
        return self.fs.open_input_stream(path)

    def read_bytes(self, path: str) -> bytes | None:
        """The content of file ``path``, or None if it is absent (other errors are raised)."""
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except OSError:
            if not self.exists(path):
                return None
            raise

    def sha256(self, path: str) -> str:
        """The hex sha256 of file ``path``, read in chunks."""
        digest = hashlib.sha256()
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def entries(self, folder: str, recursive: bool = False) -> list[Entry]:
        """What is in ``folder`` (files and folders, with mtimes); [] if it is absent."""
        sel = pafs.FileSelector(folder, recursive=recursive, allow_not_found=True)
        return [_entry(info) for info in self.fs.get_file_info(sel)]

    def list_files(self, folder: str) -> dict[str, int | None]:
        """Every file below ``folder``: its path relative to ``folder`` -> its size."""
        prefix = folder.rstrip("/") + "/"
        found = self.entries(folder, recursive=True)
        return {e.path[len(prefix) :]: e.size for e in found if e.is_file}

    # -- writing -----------------------------------------------------------------------------

    def makedirs(self, folder: str) -> None:
        """Create ``folder`` and its parents on a local disk. Object stores have no folders to
        prepare (every write here creates its own parents there), so this does nothing there."""
        if self._local:
            os.makedirs(folder, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write file ``path`` whole: readers see the old content or the new, never half.

        Locally a synced temporary sibling (``.<name>.<uuid>.tmp``) replaces it, and its folder
        must exist; object stores make a whole object visible at once, so it is written directly.
        """
        if self._local:
            tmp = _temp_path(path)
            with open(tmp, "wb") as f:
                _write_synced(f, data)
            os.replace(tmp, path)
        else:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def create_exclusive(
        self, path: str, data: bytes, mine: Callable[[bytes | None], bool] | None = None
    ) -> bool:
        """Create file ``path`` holding ``data`` unless it exists; True if this call created it.

        Locally ``O_CREAT | O_EXCL`` makes this atomic (the folder must exist). Object stores
        have no such create: the file is written if absent, then read back and ``mine`` (default:
        the bytes are ``data``) decides whether this writer won; two writers that both see it
        absent within one round trip can both be told True.
        """
        if self._local:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                _write_synced(f, data)
            return True
        if self.read_bytes(path) is not None:
            return False
        self.write_bytes(path, data)
        got = self.read_bytes(path)
        return got == data if mine is None else mine(got)

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[Any]:
        """A binary output stream that creates file ``path`` and its parents; locally it is
        synced on a clean exit, so a published file is on disk before anything points to it."""
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
        else:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as out:
                yield out

    def upload(self, local_file: str, path: str) -> tuple[str, int]:
        """Copy a local file to file ``path`` (parents created); its (sha256, size), computed
        while copying, so a manifest never costs a second read of the data."""
        digest, size = hashlib.sha256(), 0
        with self.open_write(path) as out, open(local_file, "rb") as inp:
            while chunk := inp.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return digest.hexdigest(), size

    # -- moving and removing -----------------------------------------------------------------

    def rename(self, src: str, dst: str) -> None:
        """Rename file ``src`` to ``dst``; raises OSError if ``src`` is gone (someone moved it
        first). Atomic locally; on object stores whatever ``fs.move`` does."""
        if self._local:
            os.rename(src, dst)
        else:
            self.fs.move(src, dst)

    def copy_if_absent(self, src: str, dst: str) -> None:
        """Put file ``src``'s content at ``dst`` unless something is there already (or ``src``
        vanished). Locally a hard link, atomic; elsewhere a check, then a copy."""
        if self._local:
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                os.link(src, dst)
        elif self.read_bytes(dst) is None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.copy_file(src, dst)

    def move_tree(self, src: str, dst: str, last: str | None = None) -> bool:
        """Move folder ``src`` to ``dst``; False if ``src`` vanished. Object stores copy each
        file (``last``, e.g. a manifest, after all others), then delete ``src``."""
        if self._local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                return False
            return True
        files = self.list_files(src)
        if not files:
            return False
        for rel in sorted(files, key=lambda r: r == last):
            self.fs.create_dir(f"{dst}/{rel}".rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(f"{src}/{rel}", f"{dst}/{rel}")
        self.fs.delete_dir(src)
        return True

    def move_tree_if_absent(self, src: str, dst: str, last: str | None = None) -> bool:
        """Move folder ``src`` to ``dst`` unless ``dst`` exists; False if it did not move.

        Locally one rename, atomic, that fails if ``dst`` exists (or ``src`` is gone). Object
        stores check, then copy as ``move_tree`` does (True once the copy ran): two writers may
        both find ``dst`` absent, so callers hold a lock and re-read ``dst`` afterwards.
        """
        if self._local:
            try:
                os.rename(src, dst)
            except OSError:
                return False
            return True
        if self.exists(dst):
            return False
        self.move_tree(src, dst, last)
        return True

    def remove_file(self, path: str) -> None:
        """Delete file ``path``; raises FileNotFoundError (an OSError) if it is absent."""
        self.fs.delete_file(path)

    def remove_tree(self, path: str) -> None:
        """Delete folder ``path`` and everything in it, best effort (errors are ignored)."""
        if self._local:
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.fs.delete_dir(path)
