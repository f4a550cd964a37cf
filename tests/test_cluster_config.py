"""cluster.yaml: valid for Ray's cluster launcher, and consistent with the README and the design.

No Ray is started and nothing touches the network or the cloud: the config goes through the same
schema validation and default-filling that `ray up` runs before it calls AWS.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
README = ROOT / "README.md"
SWEEP_PART = " && .venv/bin/python -m ray_lt.sweep"
VENV_RAY = "~/ray-lt/.venv/bin/ray"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def commands(config: dict[str, Any], *keys: str) -> list[str]:
    return [cmd for key in keys for cmd in config.get(key, [])]


def readme_install_part() -> str:
    """The README's first set-up command, up to where it starts the quickstart sweep."""
    text = README.read_text()
    section = text.split("## Set-up on a fresh machine", 1)[1]
    block = re.search(r"^```[^\n]*\n(.*?)^```", section, re.S | re.M)
    assert block, "no fenced command after '## Set-up on a fresh machine'"
    command = block.group(1).strip().splitlines()[0]
    assert SWEEP_PART in command, command
    return command.split(SWEEP_PART, 1)[0]


def env_value(config: dict[str, Any], name: str) -> str:
    found = re.findall(rf"export {name}=(\S+)", "\n".join(commands(config, "setup_commands")))
    assert len(found) == 1, f"{name} should be exported once in setup_commands: {found}"
    return found[0]


def test_ray_validates_the_file_as_written(config):
    validate_config(copy.deepcopy(config))


def test_ray_validates_the_config_ray_up_prepares(config):
    # `ray up` fills in the provider's defaults and merges setup commands, then validates; the
    # next step (resource autodetection, IAM, subnets) needs AWS and is not run here.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "ray.head.default"
    for cmd in commands(config, "setup_commands"):
        assert cmd in prepared["head_setup_commands"]
        assert cmd in prepared["worker_setup_commands"]


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda c: c.update(max_wokers=8), id="unknown-top-level-key"),
        pytest.param(
            lambda c: c["available_node_types"]["ray.worker.gpu"].update(max_workers="many"),
            id="max_workers-not-an-integer",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["ray.worker.gpu"].pop("node_config"),
            id="node-type-without-node_config",
        ),
    ],
)
def test_ray_rejects_a_broken_copy(config, break_it):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_setup_installs_exactly_as_the_readme_does(config):
    install = readme_install_part()
    assert install.startswith("python3 -m venv .venv"), install
    setup = commands(config, "setup_commands")
    assert f"cd ~/ray-lt && {install}" in setup, (install, setup)
    assert config["file_mounts"]["~/ray-lt"] == "."
    for local_only in (".venv", "ray_lt_store", "mlflow.db", ".git"):
        assert local_only in config["rsync_exclude"]


def test_ray_runs_from_the_project_venv(config):
    start = commands(config, "head_start_ray_commands", "worker_start_ray_commands")
    calls = re.findall(r"(\S*)\bray (start|stop)\b", "\n".join(start))
    assert len(calls) == 4, calls
    assert all(prefix == VENV_RAY.removesuffix("ray") for prefix, _ in calls), calls


def test_head_runs_the_tracking_server_with_sql_backend_and_s3_artifacts(config):
    head = commands(config, "head_start_ray_commands")
    servers = [cmd for cmd in head if "-m ray_lt.tracking_server" in cmd]
    assert len(servers) == 1, head
    server = servers[0]
    assert "~/ray-lt/.venv/bin/python -m ray_lt.tracking_server" in server
    backend = re.search(r"--backend-store-uri (\S+)", server).group(1)
    assert backend.startswith("sqlite:"), backend
    destination = re.search(r"--artifacts-destination (\S+)", server).group(1)
    if destination.startswith("$"):
        destination = env_value(config, destination.strip("${}"))
    assert destination.startswith("s3://"), destination
    host = re.search(r"--host (\$\([^)]*\)|\S+)", server).group(1)
    assert host not in ("0.0.0.0", "::"), host
    # in the background, with a log, and a pid file so a later `ray up` can stop it
    assert "nohup" in server and "> ~/mlflow-server.log 2>&1" in server, server
    assert "& echo $! > ~/mlflow-server.pid" in server, server
    # the server starts before Ray, and sweeps on the head find it through the same address
    ray_start = next(i for i, cmd in enumerate(head) if "ray start --head" in cmd)
    assert head.index(server) < ray_start
    uri = [cmd for cmd in head if "MLFLOW_TRACKING_URI=" in cmd]
    assert len(uri) == 1 and host in uri[0] and ":5000" in uri[0], uri


def test_dashboard_stays_on_localhost(config):
    (start,) = [c for c in commands(config, "head_start_ray_commands") if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in "\n".join(commands(config, "head_start_ray_commands"))
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def test_workers_join_the_head(config):
    (start,) = [c for c in commands(config, "worker_start_ray_commands") if "ray start" in c]
    assert "--address=$RAY_HEAD_IP:6379" in start


def test_head_takes_no_trials_and_gpu_workers_autoscale(config):
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = types["ray.worker.gpu"]
    assert gpu["min_workers"] < gpu["max_workers"] <= config["max_workers"]
    assert gpu["resources"] in ({}, {"GPU": 1}), "GPU count: Ray's autodetection or 1"
    assert config["provider"]["type"] == "aws"
    assert isinstance(config["provider"]["cache_stopped_nodes"], bool)


def test_store_is_an_s3_uri_pyarrow_parses(config):
    store = env_value(config, "RAY_LT_STORE")
    parsed = urlparse(store)
    assert parsed.scheme == "s3" and parsed.netloc and parsed.path.strip("/"), store
    assert env_value(config, "MLFLOW_ARTIFACTS").startswith("s3://")
    # pyarrow resolves a bucket's region over the network unless the URI names it, and the AWS
    # SDK asks the EC2 metadata service for credentials: name the region, switch the metadata
    # lookup off and give dummy keys, in a child process so the SDK's global state stays there.
    uri = f"{store}?region={config['provider']['region']}"
    code = (
        "import sys, pyarrow.fs as f\n"
        "fs, path = f.FileSystem.from_uri(sys.argv[1])\n"
        "print(type(fs).__name__, fs.region, path)\n"
    )
    env = {
        **os.environ,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    env.pop("AWS_PROFILE", None)
    out = subprocess.run(
        [sys.executable, "-c", code, uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out == ["S3FileSystem", config["provider"]["region"], parsed.netloc + parsed.path]
