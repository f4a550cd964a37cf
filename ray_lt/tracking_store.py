"""Where MLflow keeps a sweep's runs: the tracking URI, checked before Ray starts.

A URI is normalised (a bare path is a SQLite file), a server is checked for reachability in
seconds, and a new SQLite database is created and migrated by one process at a time (MLflow's
own creation races when several trials open it at once); a database left half-migrated by an
older MLflow is refused with the command that repairs it. Every failure is one ``RayLtError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from ray_lt.errors import RayLtError

SQLITE = "sqlite:///"
LOCK_WAIT_S = 120.0  # MLflow creates and migrates a new database in seconds
_SQLITE_READY: set[str] = set()  # SQLite URIs this process has checked and set up
# MLflow's own refusal of a database whose alembic revision is not its head
_MLFLOW_OUTDATED = re.compile(
    r"out-of-date database schema \(found version (\S+), but expected (\S+)\)"
)


def default_tracking_uri(cwd: str | None = None) -> str:
    """A SQLite store in the working directory, as an absolute URI (Tune changes the CWD)."""
    return f"sqlite:///{os.path.abspath(os.path.join(cwd or os.getcwd(), 'mlflow.db'))}"


def normalize_uri(uri: str) -> str:
    """One absolute tracking URI for what users type.

    ``sqlite:///rel.db`` and ``x.db`` become absolute SQLite URIs (Tune changes the working
    directory of trials); a local folder, plain or ``file://``, holds ``mlflow.db`` (MLflow's file
    store is refused by default since 3.x, docs/ray_notes.md); ``http(s)://`` and other schemes are
    kept as they are.
    """
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return f"sqlite:///{os.path.abspath(path)}" if not path.startswith("/") else uri
    if uri.startswith("file:"):
        uri = urllib.parse.unquote(urllib.parse.urlparse(uri).path)
    if "://" in uri:
        return uri
    path = os.path.abspath(os.path.expanduser(uri))
    return f"sqlite:///{path if path.endswith('.db') else os.path.join(path, 'mlflow.db')}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in one line, fast, when an ``http(s)://`` tracking server does not answer.

    MLflow's own client would retry for minutes before failing; this asks the server's
    ``/health`` endpoint once.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        reason = " ".join(str(getattr(err, "reason", err)).split())[:120]
    raise RayLtError(
        f"cannot reach the MLflow tracking server {uri} ({reason}); start it (python -m "
        "ray_lt.tracking_server --port N) or pass --tracking-uri sqlite:///mlflow.db"
    )


@contextlib.contextmanager
def sqlite_setup(uri: str) -> Iterator[None]:
    """Run the first opening of a SQLite store in this process alone among all processes.

    MLflow creates the tables and runs every migration the first time it opens an empty
    database, with no lock between processes: sweeps (or trials) starting together on a new file
    break each other and can leave it half-migrated for good. Here the file is checked first (a
    half-migrated one is refused, never touched) and MLflow's set-up then runs under an exclusive
    lock on ``<db>.lock``. Later openings in this process skip both; other schemes pass through.
    """
    if not uri.startswith(SQLITE) or uri in _SQLITE_READY:
        yield
        return
    path = uri[len(SQLITE) :]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _exclusive_lock(f"{path}.lock", LOCK_WAIT_S):
        check_schema(uri)
        yield
    _SQLITE_READY.add(uri)


@contextlib.contextmanager
def _exclusive_lock(lock_path: str, wait_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``, waiting at most ``wait_s`` seconds.

    A blocking ``flock`` cannot time out without signals, which only the main thread may use;
    this polls instead. The kernel drops the lock when the holder exits, even when it crashes.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RayLtError(
            f"cannot create the lock file {lock_path} ({err.strerror}); the folder of the "
            "MLflow database must be writable"
        ) from None
    try:
        deadline = time.monotonic() + wait_s
        while not _try_flock(fd):
            if time.monotonic() > deadline:
                raise RayLtError(
                    f"waited {wait_s:.0f} s for the lock {lock_path}, held by another process "
                    "setting up this MLflow database; if none is running (fuser "
                    f"{lock_path}), run again"
                )
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def check_schema(uri: str) -> None:
    """Refuse, in one line, a SQLite file MLflow would fail on or try to migrate again.

    A first start that was interrupted (or raced) leaves alembic's temporary tables, no or an
    older ``alembic_version``, or tables without a version; MLflow then fails with a long
    traceback, or migrates again on top of the debris. Only reads the file (sqlite3, no create);
    a missing or empty file is a new database, which MLflow creates.
    """
    path = uri[len(SQLITE) :]
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    try:
        tables, revisions = _read_schema(path)
    except sqlite3.DatabaseError as err:
        raise RayLtError(
            f"{path} is not an SQLite database MLflow can open ({err}); move it aside or pass "
            "another --tracking-uri"
        ) from None
    debris = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if not debris and not revisions and "experiments" not in tables:
        return  # no MLflow table yet: MLflow creates them
    if debris or not revisions:
        found = f"leftover {', '.join(debris)}" if debris else "tables but no schema revision"
        raise _schema_error(uri, found)
    head = _head_revision()
    if revisions != [head]:
        raise _schema_error(uri, f"schema revision {', '.join(revisions)}, not {head}", older=True)


def _read_schema(path: str) -> tuple[set[str], list[str]]:
    """The table names of a SQLite file and the revisions in its ``alembic_version``."""
    conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        tables = {name for (name,) in rows}
        revisions: list[str] = []
        if "alembic_version" in tables:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            revisions = sorted(rev for (rev,) in rows)
        return tables, revisions
    finally:
        conn.close()


def _head_revision() -> str:
    """The schema revision this MLflow writes and expects (the head of its migrations)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _schema_error(uri: str, found: str, older: bool = False) -> RayLtError:
    """One line for a database MLflow cannot use as it is: what was found, and the way out."""
    path = uri[len(SQLITE) :]
    cause = "half-migrated (e.g. by an interrupted first start)"
    fix = f"move it aside (mv {shlex.quote(path)} {shlex.quote(path + '.broken')}) and run again"
    if older:
        cause += " or is older"
        fix += f", or if it is merely older, back it up and run: mlflow db upgrade {uri}"
    return RayLtError(f"the MLflow database {path} ({found}) was left {cause}; {fix}")


def _store_error(uri: str, err: Exception) -> RayLtError:
    """One line for a tracking store that failed to open or answer."""
    text = str(err)
    outdated = _MLFLOW_OUTDATED.search(text)
    if uri.startswith(SQLITE) and outdated:
        found = f"schema revision {outdated[1]}, not {outdated[2]}"
        return _schema_error(uri, found, older=True)
    first = text.splitlines()[0][:200] if text else ""
    return RayLtError(
        f"cannot reach the MLflow tracking store {uri} ({type(err).__name__}: {first}); "
        "start the server or pass --tracking-uri"
    )
