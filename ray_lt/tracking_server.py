"""``python -m ray_lt.tracking_server``: an MLflow tracking server, bound to 127.0.0.1 by default.

A thin launcher around ``mlflow server`` for two places: the cluster head (``cluster.yaml``
binds it to the head's private address, SQL backend on the head's disk, artifacts in object
storage) and the tests, which start a real server and stop it. It never binds to every
interface unless told to, and it waits for ``/health`` so a caller knows the server is up.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ray_lt.errors import RayLtError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TrackingServer:
    """A running ``mlflow server`` child process (its own process group, stopped as a whole).

    Args:
        backend_store_uri: SQL backend, e.g. ``sqlite:////abs/mlflow.db``.
        artifacts_destination: where run artifacts go (a folder or an object-store URI).
        host: the address to bind; 127.0.0.1 unless you mean to serve other machines.
        port: the port; a free one when None.
        log_path: the server's stdout and stderr (default: beside a SQLite database, or /tmp).
    """

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination
        if log_path is None:
            folder = (
                Path(backend_store_uri[len("sqlite:///") :]).parent
                if backend_store_uri.startswith("sqlite:///")
                else Path("/tmp")
            )
            log_path = folder / f"mlflow-server-{self.port}.log"
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            "--workers",
            "1",
        ]

    def start(self, timeout_s: float = 120.0) -> TrackingServer:
        """Start the server and wait until ``/health`` answers OK."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RayLtError(
                    f"mlflow server exited with {self.process.returncode} before answering; "
                    f"see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.read().strip() == b"OK":
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RayLtError(f"mlflow server at {self.uri} did not answer in {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM the whole process group (uvicorn and its job workers), then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> TrackingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_lt.tracking_server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", required=True, help="e.g. sqlite:////abs/mlflow.db")
    p.add_argument(
        "--artifacts-destination", required=True, help="a folder or e.g. s3://bucket/mlflow"
    )
    args = p.parse_args(argv)
    server = TrackingServer(
        args.backend_store_uri, args.artifacts_destination, host=args.host, port=args.port
    )
    os.execv(sys.executable, server.command())  # foreground: the caller (nohup, systemd) owns it


if __name__ == "__main__":
    sys.exit(main())
