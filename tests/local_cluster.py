"""A real multi-node Ray cluster on this machine: ``ray start --head`` plus worker nodes.

Each node is its own ``ray start --block`` process in its own session, so a test can stop one
whole node (its raylet, object store and every worker process) while the others keep running.
Worker nodes carry a distinct custom resource (``node_w1``, ``node_w2``) so a test can tell them
apart. Authentication is off (``RAY_AUTH_MODE=disabled``); everything binds to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from ray_lt.tracking_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # notice a stopped node in seconds, not the default half minute
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class LocalCluster:
    """A head and ``workers`` nodes. The head has ``head_cpus`` CPUs: by default none, so only
    the driver's bookkeeping lands there.

    The head keeps its session files in a temporary folder of its own (not ``/tmp/ray``), so a
    bare ``ray.init(address="auto")`` elsewhere on this machine (another test, another pytest
    worker) never finds this cluster. The folder's path is short: Ray's socket paths live below
    it and must stay under the system's 107 characters.
    """

    def __init__(
        self, logdir: Path, workers: int = 2, cpus_per_worker: int = 2, head_cpus: int = 0
    ) -> None:
        self.logdir = logdir
        self.port = free_port()
        self.dashboard_port = free_port()
        self.nodes: dict[str, subprocess.Popen] = {}
        self.workers = workers
        self.cpus = cpus_per_worker
        self.head_cpus = head_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
        # The state API Ray Train's clean-up asks must be this cluster's even when other Ray
        # instances run on the machine; the nodes' workers inherit this.
        self.env = {**os.environ, **ENV, "RAY_API_SERVER_ADDRESS": self.dashboard}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.nodes[name] = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def start(self) -> LocalCluster:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                f"--num-cpus={self.head_cpus}",
                f"--temp-dir={self.temp_dir}",
                "--object-store-memory=200000000",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats",
            ],
        )
        self._wait(lambda: self._nodes_alive() >= 1, "the head node")
        for i in range(1, self.workers + 1):
            self.add_worker(f"w{i}")
        return self

    def add_worker(self, name: str) -> None:
        self._start(
            name,
            [
                f"--address={self.address}",
                f"--num-cpus={self.cpus}",
                "--object-store-memory=200000000",
                f"--resources={json.dumps({f'node_{name}': 1})}",
            ],
        )
        want = sum(1 for n, p in self.nodes.items() if p.poll() is None)
        self._wait(lambda: self._nodes_alive() >= want, f"worker node {name}")

    def _nodes_alive(self) -> int:
        return sum(n["state"] == "ALIVE" for n in self.node_list())

    def node_list(self) -> list[dict]:
        """Nodes from the dashboard's state API (empty while it is not up)."""
        try:
            url = f"{self.dashboard}/api/v0/nodes?limit=100&detail=true"
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []

    def actors(self, class_name: str) -> list[dict]:
        """Alive actors of a class, each with its ``node_id``."""
        url = (
            f"{self.dashboard}/api/v0/actors?limit=1000&detail=true"
            f"&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            rows = json.loads(r.read())["data"]["result"]["result"]
        return [a for a in rows if a["state"] == "ALIVE"]

    def node_name(self, node_id: str) -> str | None:
        """``w1``/``w2``/``head`` for a Ray node id."""
        for node in self.node_list():
            if node["node_id"] == node_id:
                total = node.get("resources_total", {})
                names = [k[len("node_") :] for k in total if k.startswith("node_w")]
                return names[0] if names else "head"
        return None

    def kill_node(self, name: str) -> None:
        """SIGKILL a node's whole process tree, as a lost machine."""
        proc = self.nodes.pop(name)
        _kill(_tree(psutil.Process(proc.pid)) + [psutil.Process(proc.pid)])
        proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM every node at once, then SIGKILL whatever of their trees is left."""
        stop_nodes([p.pid for p in self.nodes.values() if p.poll() is None], self.temp_dir)
        for proc in self.nodes.values():
            proc.poll()  # reap what stop_nodes ended
        self.nodes.clear()

    def record(self) -> dict:
        """What another process needs to join this cluster and, at the end, to stop it."""
        return {
            "address": self.address,
            "pids": [p.pid for p in self.nodes.values()],
            "temp_dir": self.temp_dir,
        }

    def _wait(self, ready, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [n for n, p in self.nodes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray node {dead} exited; see {self.logdir}")
            time.sleep(1)
        raise RuntimeError(f"{what} did not come up in {timeout_s:.0f} s; see {self.logdir}")


def stop_nodes(pids: list[int], temp_dir: str) -> None:
    """SIGTERM the ``ray start --block`` processes ``pids`` at once, wait for them (15 s), then
    SIGKILL whatever of their process trees is left; remove the cluster's session folder. Works
    from any process, not only the one that started the nodes."""
    procs, trees = [], []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            trees.extend(_tree(proc))
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    _kill(alive + trees)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    """Every descendant of ``proc`` (a node's raylet, object store, workers), read before it is
    signalled: once it is gone, its children are re-parented and no longer found from it."""
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(procs: list[psutil.Process]) -> None:
    """SIGKILL each of ``procs`` that is still there."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
