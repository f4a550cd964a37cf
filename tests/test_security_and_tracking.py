"""Security and tracking URIs: what binds where, what is never unpickled, what a URI means.

Real parts: a real ``mlflow server`` process (its listening sockets read from the kernel), a real
in-process Ray with its dashboard, real checkpoint files crafted to run code when unpickled, the
real sweep CLI against a tracking server that is not there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ray_lt.errors import ConfigError
from ray_lt.pipeline import TrialContext, run_pipeline
from ray_lt.tracking import Tracker
from ray_lt.tracking_server import TrackingServer, free_port
from ray_lt.tracking_store import normalize_uri
from tests.conftest import tiny_ce

ROOT = Path(__file__).resolve().parent.parent


class _RunsCode:
    """Unpickling this would create ``path``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _listening(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    pids = {p.pid for p in procs}
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


def test_tracking_server_binds_to_loopback_by_default(tmp_path):
    with TrackingServer(f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "art")) as server:
        assert server.uri.startswith("http://127.0.0.1:")
        addresses = _listening(server.process.pid)
        assert addresses == {"127.0.0.1"}, addresses
        Tracker(server.uri, "bind-check")  # a real client gets through
    assert server.process.poll() is not None  # stopped, with its worker processes


# The sweep's in-process Ray, started as ``ray_lt.sweep`` starts it; prints its dashboard's host
# and the addresses that listen on its port.
BIND_CHECK = """
import json, psutil, ray
from ray_lt.sweep import _ray_init_kwargs
context = ray.init(num_cpus=1, **_ray_init_kwargs(None))
host, port = context.dashboard_url.rsplit(":", 1)
bound = {
    c.laddr.ip
    for c in psutil.net_connections(kind="tcp")
    if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)
}
print(json.dumps({"url": context.dashboard_url, "host": host, "bound": sorted(bound)}))
ray.shutdown()
"""


@pytest.mark.ray
def test_in_process_ray_dashboard_binds_to_loopback():
    # in a process of its own: an in-process Ray leaves its process in Ray's token mode, and no
    # later driver there could use the session's Ray head (tests/conftest.py)
    proc = subprocess.run(
        [sys.executable, "-c", BIND_CHECK], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["host"] == "127.0.0.1", seen["url"]
    assert seen["bound"] == ["127.0.0.1"], seen


def test_crafted_stage_checkpoint_is_refused_and_never_runs(tmp_path):
    store = tmp_path / "store"
    spec = tiny_ce(epochs=2)
    proof = tmp_path / "code-ran"
    ckpt = store / "_train" / spec.key
    ckpt.mkdir(parents=True)
    torch.save({"epoch": 1, "model": _RunsCode(proof)}, ckpt / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        run_pipeline(spec, TrialContext(store_uri=str(store), in_process="cpu"))
    assert not proof.exists()


def test_crafted_weights_file_is_refused_and_never_runs(tmp_path):
    from ray_lt.models.resnet_tv import read_state_dict

    proof = tmp_path / "code-ran"
    weights = tmp_path / "resnet.pth"
    torch.save({"state_dict": _RunsCode(proof)}, weights)
    with pytest.raises(ConfigError, match="cannot read weights file"):
        read_state_dict(weights)
    assert not proof.exists()


def test_no_code_path_unpickles_untrusted_bytes():
    """Every ``torch.load`` is ``weights_only=True``; no pickle or cloudpickle load anywhere
    (CIFAR's pickle folders go through an allow-list unpickler, tested in test_data_cifar)."""
    offenders = []
    for path in (ROOT / "ray_lt").rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        for pattern in (r"\bpickle\.loads?\(", r"cloudpickle\.loads?\(", r"\.Unpickler\("):
            for hit in re.findall(pattern, text):
                if path.name != "cifar.py":
                    offenders.append(f"{path.name}: {hit}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("runs.db", "sqlite:///{cwd}/runs.db"),
        ("sqlite:///rel/runs.db", "sqlite:///{cwd}/rel/runs.db"),
        ("sqlite:////abs/runs.db", "sqlite:////abs/runs.db"),
        ("tracking", "sqlite:///{cwd}/tracking/mlflow.db"),
        ("file:///abs/tracking", "sqlite:////abs/tracking/mlflow.db"),
        ("file:///abs/t.db", "sqlite:////abs/t.db"),
        ("http://10.0.0.5:5000", "http://10.0.0.5:5000"),
        ("https://mlflow.example.org", "https://mlflow.example.org"),
    ],
)
def test_tracking_uri_forms(typed, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert normalize_uri(typed) == expected.format(cwd=tmp_path)


def test_local_folder_tracking_uri_holds_a_sqlite_store(tmp_path):
    tracker = Tracker(f"file://{tmp_path / 'tracking'}", "folder-uri")
    run = tracker.start_trial("t1", {"lr": 0.1}, smoke=True)
    assert (tmp_path / "tracking" / "mlflow.db").exists()
    assert tracker.client.get_run(run).data.params["lr"] == "0.1"


def test_unreachable_tracking_server_fails_fast_in_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    tic = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_lt.sweep",
            str(ROOT / "tests" / "fixtures" / "shared_ce.py"),
            "--store",
            str(tmp_path / "store"),
            "--tracking-uri",
            uri,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert uri in lines[0] and "start it" in lines[0] and "--tracking-uri" in lines[0]
    assert time.monotonic() - tic < 120  # no minutes of HTTP retries; Ray never started
    assert not (tmp_path / "store" / "_tune").exists()
