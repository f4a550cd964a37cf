"""Ray's cluster launcher for real: `ray up`, `ray exec`, `ray down`, and the autoscaler.

``test_lab_cluster_up_sweep_report_down`` runs ``cluster.local.yaml`` (the on-premise
launcher config) as a user does, on one machine: a real ``sshd`` of the test's own (own config,
host key and authorised key in a temporary folder) listens on 127.0.0.3 (the head) and 127.0.0.2
(a worker), and a lab account is made for the test; ``sshd`` gives each address its own home
folder, so the two "machines" share nothing but the folder that stands for the lab's NFS share.
The head is not 127.0.0.1 because ``ray start`` replaces that one address (and ``localhost``)
with the machine's network address; every other loopback address it keeps, so all of the
cluster's traffic stays on loopback. Then ``ray up``, a ``ray exec`` of the sweep,
a ``ray exec`` of the report and ``ray down``, exactly the README's commands.

``test_autoscaler_adds_gpu_workers_for_waiting_trials_and_removes_them`` starts a head with
Ray's fake multi-node provider (tests/fixtures/fake_gpu_cluster.yaml: no worker at the start,
GPU workers on demand) and runs a sweep with ``--gpus-per-worker 1`` and with ``auto``.

Both stop only what they started: each of their processes carries the test's own HOME.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from ray._common.utils import get_default_ray_temp_dir

from ray_lt.artifacts import ArtifactStore
from ray_lt.preflight import node_types_in_launcher_config
from ray_lt.spec import Resources
from ray_lt.sweep import main, parse_args
from ray_lt.tracking_server import free_port
from ray_lt.tuning import scalable_gpus, worker_resources

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
HEAD, WORKER = "127.0.0.3", "127.0.0.2"
INSTALL = "cd ~/ray-lt && python3 -m venv .venv && .venv/bin/pip install -e ."
SWEEP = (
    "cd ~/ray-lt && .venv/bin/python -m ray_lt.sweep experiments/quickstart.py --smoke"
    " --address auto --store $RAY_LT_STORE --tracking-uri $MLFLOW_TRACKING_URI"
)
REPORT = (
    "cd ~/ray-lt && .venv/bin/python -m ray_lt.report experiments/quickstart.py --smoke"
    " --tracking-uri $MLFLOW_TRACKING_URI"
)
# prints {node id: node address} once the worker has joined (the test's check, not the user's)
NODES = (
    '~/ray-lt/.venv/bin/python -c \'import json, time, ray; ray.init(address="auto")\n'
    'while sum(n["Alive"] for n in ray.nodes()) < 2: time.sleep(1)\n'
    'print("NODES", json.dumps({n["NodeID"]: n["NodeManagerAddress"]'
    ' for n in ray.nodes() if n["Alive"]}))\''
)


# ---------------------------------------------------------------- `--gpus-per-worker auto`


def _experiment(concurrent: int = 2):
    from ray_lt.experiment import Experiment
    from tests.conftest import tiny_ce

    return Experiment(
        name="auto-gpus",
        pipeline=lambda config: tiny_ce(),
        param_space={},
        search="grid",
        max_concurrent_trials=concurrent,
    )


def test_auto_shares_the_gpus_the_cluster_has():
    res = worker_resources(_experiment(4), None, None, {"CPU": 8.0, "GPU": 2.0}, node_types=[])
    assert res.gpus_per_worker == 0.5


def test_auto_counts_the_gpus_an_empty_cluster_can_add():
    gpu = [("ray.worker.gpu", {"CPU": 4.0, "GPU": 1.0}, 8)]
    res = worker_resources(_experiment(4), None, None, {"CPU": 0.0}, node_types=gpu)
    assert res.gpus_per_worker == 1.0  # 8 GPU workers can come, one per concurrent stage
    one = [("ray.worker.gpu", {"CPU": 4.0, "GPU": 1.0}, 1)]
    assert worker_resources(_experiment(4), None, None, {}, node_types=one).gpus_per_worker == 0.25


def test_num_workers_overrides_every_stage_and_zero_trains_inline(tmp_path, capsys):
    gpus = {"CPU": 8.0, "GPU": 2.0}
    res = worker_resources(_experiment(4), None, None, gpus, node_types=[], workers=2)
    assert (res.num_workers, res.gpus_per_worker) == (2, 0.5)  # auto still shares the GPUs
    inline = worker_resources(_experiment(4), None, 0.5, gpus, node_types=[], workers=0)
    assert inline == Resources(num_workers=0, cpus_per_worker=0.5)  # on the trial's CPU
    cpu_only = worker_resources(_experiment(), None, None, {"CPU": 4.0}, node_types=[], workers=3)
    assert (cpu_only.num_workers, cpu_only.gpus_per_worker) == (3, 0.0)
    with pytest.raises(SystemExit) as bad:
        parse_args(["x.py", "--num-workers", "-1"])
    assert bad.value.code == 2 and "must be an int >= 0" in capsys.readouterr().err
    store = tmp_path / "store"
    argv = ["x.py", "--num-workers", "0", "--gpus-per-worker", "1", "--store", str(store)]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: --num-workers 0 trains every stage inline on its trial's CPU, so it cannot "
        "take --gpus-per-worker 1; drop one of the two"
    ]
    assert not store.exists()  # checked before anything else


def test_auto_stays_on_cpus_without_gpu_node_types():
    cpu = [("local.cluster.node", {}, 2), ("ray.worker.cpu", {"CPU": 8.0}, 4)]
    assert worker_resources(_experiment(), None, None, {"CPU": 4.0}, node_types=cpu) is None
    assert scalable_gpus(cpu) == 0


def test_node_types_come_from_the_launcher_config_ray_up_leaves_on_the_head(tmp_path):
    # what `ray up` wrote for the AWS file: Ray filled in the GPU worker's resources
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["ray.worker.gpu"]["resources"] = {"CPU": 4, "GPU": 1}
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    types = node_types_in_launcher_config(str(path))
    assert types == [("ray.worker.gpu", {"CPU": 4.0, "GPU": 1.0}, 8)]  # not the head's type
    assert scalable_gpus(types) == 8
    assert node_types_in_launcher_config(str(tmp_path / "missing.yaml")) == []


def test_lab_config_is_what_ray_up_accepts_and_installs_as_the_readme_does():
    from ray.autoscaler._private.util import prepare_config, validate_config

    from tests.test_cluster_config import readme_install_part

    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    prepared = prepare_config(config)  # what `ray up` does before it dials the head
    validate_config(prepared)
    node_type = prepared["available_node_types"]["local.cluster.node"]
    assert node_type["min_workers"] == node_type["max_workers"] == 2  # every listed worker
    assert INSTALL == f"cd ~/ray-lt && {readme_install_part()}"
    assert INSTALL in config["setup_commands"]
    assert "~/.ray/auth_token" in config["cluster_synced_files"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head and "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head


# ---------------------------------------------------------------- processes of a test


def _processes_with_home(*homes: Path) -> list[psutil.Process]:
    """Live processes whose HOME is one of ``homes``: what the test started, and nothing else."""
    wanted = {str(h) for h in homes}
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("HOME") in wanted and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _owner(proc: psutil.Process) -> str | None:
    try:
        return proc.username()
    except (psutil.Error, KeyError):
        return None


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            continue
    return out


def _wait_gone(*homes: Path, timeout_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = _processes_with_home(*homes)
        if not left:
            return []
        time.sleep(1)
    return _describe(_processes_with_home(*homes))


# ---------------------------------------------------------------- the lab cluster over SSH


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _wait_listening(host: str, port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"sshd does not listen on {host}:{port}: {log.read_text()[-2000:]}")


def _shared_venv(path: Path) -> Path:
    """A venv the lab account can run, holding no package of its own: it sees this test's venv
    through a ``.pth`` file, so nothing is installed. (The test's venv may rest on an interpreter
    in root's home, which the account cannot enter; the system's Python of the same version
    runs the same wheels.)"""
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        pytest.skip(f"no {system} for the lab account to run this venv's packages with")
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(path)], check=True)
    site = path / "lib" / system.name / "site-packages"
    packages = next((VENV / "lib").glob("python3*/site-packages"))
    (site / "ray_lt_test_venv.pth").write_text(
        f"import site; site.addsitedir({str(packages)!r})\n"
    )
    ray = path / "bin" / "ray"
    ray.write_text(f"#!{path}/bin/python\nimport sys\nfrom ray.scripts.scripts import main\n"
                   "sys.exit(main())\n")  # fmt: skip
    ray.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def sshd():
    """An sshd of the test's own on 127.0.0.3 and 127.0.0.2 (port 22, or a free port reached
    through an SSH ProxyCommand when 22 is taken, since Ray's launcher always dials 22), and a
    lab account made for the test: its home is the head's home, and the worker's address logs
    in to a home of its own. Being an ordinary account, its ``ray stop`` (which ``ray down``
    runs) can stop only its own processes, never another Ray on this machine."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    missing = [t for t in ("ssh", "ssh-keygen", "rsync", "useradd") if not shutil.which(t)]
    if not Path(binary).exists() or missing:
        pytest.skip(
            f"missing {missing or ['sshd']}: `ray up` needs an SSH server, ssh and rsync "
            "(apt-get install openssh-server rsync; .ci/run installs them)"
        )
    if os.geteuid() != 0:
        pytest.skip("the launcher test adds a lab account and runs sshd on port 22: needs root")
    base = Path(tempfile.mkdtemp(prefix="rlt-ssh-"))  # short: Ray's socket paths live below
    base.chmod(0o755)
    homes = {HEAD: base / "head", WORKER: base / "worker"}
    shared = base / "nfs"  # the lab's NFS share: the same path on every machine
    user = f"rlt{os.getpid()}"
    key = base / "id_ed25519"
    for path in (base / "host_key", key):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True
        )
    shutil.copy(f"{key}.pub", base / "authorized_keys")
    (base / "authorized_keys").chmod(0o644)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", str(homes[HEAD]),
         "--shell", "/bin/bash", user],
        check=True,
    )  # fmt: skip
    proc = None
    try:
        subprocess.run(["usermod", "-p", "*", user], check=True)  # no password, not locked
        venv = _shared_venv(base / "venv")
        for folder in (*homes.values(), shared):
            folder.mkdir()
            shutil.chown(folder, user, user)
        port = 22 if _port_free(HEAD, 22) and _port_free(WORKER, 22) else free_port()
        (base / "sshd_config").write_text(
            f"ListenAddress {HEAD}:{port}\nListenAddress {WORKER}:{port}\n"
            f"HostKey {base / 'host_key'}\nPidFile {base / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {base / 'authorized_keys'}\nAllowUsers {user}\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nMaxSessions 50\nMaxStartups 50\n"
            f"Match LocalAddress {WORKER}\n    SetEnv HOME={homes[WORKER]}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        log = base / "sshd.log"
        proc = subprocess.Popen(
            [binary, "-D", "-e", "-f", str(base / "sshd_config")],
            stdout=open(log, "wb"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_listening(HEAD, port, proc, log)
        _wait_listening(WORKER, port, proc, log)
        yield {
            "homes": homes,
            "shared": shared,
            "key": key,
            "port": port,
            "user": user,
            "venv": venv,
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        _kill(_processes_with_home(*homes.values()))
        for _ in range(10):  # userdel refuses while a process of the account lives
            _kill([q for q in psutil.process_iter() if _owner(q) == user])
            if subprocess.run(["userdel", user], capture_output=True).returncode in (0, 6):
                break
            time.sleep(1)
        shutil.rmtree(base, ignore_errors=True)


def _lab_config(sshd: dict, name: str, shared: Path, ports: dict[str, int]) -> dict:
    """cluster.local.yaml as a user fills it in, for the two loopback "machines"."""
    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    config["cluster_name"] = name
    config["provider"].update(head_ip=HEAD, worker_ips=[WORKER])
    config["auth"] = {"ssh_user": sshd["user"], "ssh_private_key": str(sshd["key"])}
    if sshd["port"] != 22:
        config["auth"]["ssh_proxy_command"] = (
            f"bash -c 'exec 3<>/dev/tcp/%h/{sshd['port']}; cat <&3 & cat >&3'"
        )
    config["file_mounts"] = {"~/ray-lt": str(ROOT)}

    def edit(cmd: str) -> str:
        cmd = cmd.replace("/mnt/ray-lt", str(shared))
        cmd = cmd.replace(":6379", f":{ports['ray']}").replace(
            "--port=6379", f"--port={ports['ray']}"
        )
        return cmd.replace("--port 5000", f"--port {ports['mlflow']}").replace(
            ":5000", f":{ports['mlflow']}"
        )

    setup = config["setup_commands"]
    # The README's install is what the file runs on a real machine; here both "machines" use
    # the packages of the venv this test runs in (an install would download gigabytes).
    assert INSTALL in setup, setup
    setup[setup.index(INSTALL)] = f"ln -sfn {sshd['venv']} ~/ray-lt/.venv"
    # each "machine" its own temporary folder, as on real machines (Ray keeps its sessions,
    # the address `--address auto` reads and the launcher's cluster state there)
    setup.append(
        "mkdir -p ~/t && sed -i '/RAY_TMPDIR/d' ~/.bashrc && "
        "echo 'export RAY_TMPDIR=$HOME/t' >> ~/.bashrc"
    )
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        # On one machine a node's `ray stop` would stop the other node too; real machines
        # each stop only their own Ray.
        config[key] = [edit(c) for c in config[key] if not c.strip().endswith("bin/ray stop")]
    return config


def _ray(args: list[str], log: Path, env: dict, timeout: float) -> tuple[str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    with open(log, "a") as f:
        f.write(f"\n$ ray {' '.join(args)}  ({seconds:.1f} s, exit {proc.returncode})\n{out}")
    assert proc.returncode == 0, f"ray {args[0]} failed ({log}):\n{out[-4000:]}"
    return out, seconds


def _runs(uri: str, experiment: str, filter_string: str = "") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} on {uri}"
    return client.search_runs([exp.experiment_id], filter_string, max_results=1000)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_lab_cluster_up_sweep_report_down(sshd, tmp_path):
    homes = list(sshd["homes"].values())
    shared = sshd["shared"]
    ports = {"ray": free_port(), "mlflow": free_port()}
    name = f"ray-lt-test-{os.getpid()}"
    config_path = tmp_path / "cluster.local.yaml"
    config_path.write_text(yaml.safe_dump(_lab_config(sshd, name, shared, ports)))
    cfg = str(config_path)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "launcher.log"
    head_home = sshd["homes"][HEAD]
    up = False
    try:
        out, t_up = _ray(["up", "-y", cfg], log, env, timeout=300)
        up = True
        out, t_join = _ray(["exec", cfg, NODES], log, env, timeout=240)
        nodes = json.loads(re.findall(r"^NODES (\{.*\})\s*$", out, re.M)[-1])
        assert sorted(nodes.values()) == sorted([HEAD, WORKER]), nodes
        out, t_sweep = _ray(["exec", cfg, SWEEP], log, env, timeout=300)
        out, t_report = _ray(["exec", cfg, REPORT], log, env, timeout=180)

        # every artifact is in the shared store, trained on the worker (the head has no CPU)
        store = ArtifactStore(str(shared / "store"))
        keys = store.keys()
        assert sum(k.startswith("ce-") for k in keys) == 1, keys  # one seed: one CE
        assert sum(k.startswith("crt-") for k in keys) == 2, keys  # two configurations
        placed = {nodes[store.open(k).metrics()["node"]["ray_node_id"]] for k in keys}
        assert placed == {WORKER}, placed
        assert not (head_home / "ray-lt" / "ray_lt_store").exists()

        # every trial and stage run is in the head's MLflow server, which the test reaches
        # on the head's address like any machine of the lab
        uri = f"http://{HEAD}:{ports['mlflow']}"
        trials = _runs(uri, "quickstart-smoke", "tags.`ray_lt.role` = 'trial'")
        assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}, trials
        stages = _runs(uri, "quickstart-smoke", "tags.`ray_lt.stage_key` != ''")
        assert {r.data.tags["ray_lt.stage_key"] for r in stages} == set(keys)
        assert len(stages) == 4  # each trial's CE (trained once, reused once) and cRT
        assert list((head_home / "ray-lt" / "reports" / "quickstart-smoke").glob("*.md"))
        assert (head_home / "mlflow.db").exists()  # SQLite on the head's disk
    finally:
        t_down = 0.0
        if up:
            _, t_down = _ray(["down", "-y", cfg], log, env, timeout=180)
        # `ray down` leaves the head's MLflow server running (see cluster.local.yaml)
        pid_file = head_home / "mlflow-server.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass
        left = _wait_gone(*homes)
        _kill(_processes_with_home(*homes))
        state = Path(get_default_ray_temp_dir()) / f"cluster-{name}.state"
        for path in (state, state.with_suffix(".lock")):
            path.unlink(missing_ok=True)
        print(f"launcher log: {log}")
    assert not left, f"processes of the test left after `ray down`: {left}"
    assert up
    print(
        f"ray up {t_up:.0f} s, worker joined {t_join:.0f} s, sweep {t_sweep:.0f} s, "
        f"report {t_report:.0f} s, ray down {t_down:.0f} s"
    )


# ---------------------------------------------------------------- autoscaling from zero


# what the sweep resolves `--gpus-per-worker auto` to, connected to the fake cluster
AUTO = (
    "import ray\n"
    "from ray_lt.experiment import load_experiment\n"
    "from ray_lt.tuning import worker_resources\n"
    "ray.init(address='{address}', logging_level='ERROR')\n"
    "exp = load_experiment('tests/fixtures/gpu_trials.py')\n"
    "res = worker_resources(exp, None, None, ray.cluster_resources())\n"
    "print('GPUS', ray.cluster_resources().get('GPU', 0.0), res.gpus_per_worker)\n"
)


def _fake_head(home: Path, temp_dir: Path, port: int) -> subprocess.Popen:
    config = yaml.safe_load((ROOT / "tests" / "fixtures" / "fake_gpu_cluster.yaml").read_text())
    config["provider"]["gcs_address"] = f"{HEAD}:{port}"
    (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    return subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--node-ip-address={HEAD}",
            "--num-cpus=0",
            "--num-gpus=0",
            "--object-store-memory=150000000",
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        cwd=home,
        env=env,
        stdout=open(home / "head.log", "wb"),  # noqa: SIM115 - lives with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _autoscaler_events(temp_dir: Path) -> tuple[int, int]:
    """(GPU workers added, GPU workers removed as idle), from the autoscaler's own log."""
    log = temp_dir / "session_latest" / "logs" / "monitor.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    added = sum(map(int, re.findall(r"Adding (\d+) node\(s\) of type ray\.worker\.gpu", text)))
    removed = len(re.findall(r"Terminating the node with id \S+ and ip \S+\. \(idle\)", text))
    return added, removed


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_autoscaler_adds_gpu_workers_for_waiting_trials_and_removes_them(tmp_path):
    home = tmp_path / "head-home"
    home.mkdir()
    temp_dir = Path(tempfile.mkdtemp(prefix="rlt-"))  # short: Ray's socket paths live here
    port = free_port()
    head = _fake_head(home, temp_dir, port)
    deadline = time.monotonic() + 90
    while not (temp_dir / "ray_current_cluster").exists():  # `ray start` writes it when up
        assert head.poll() is None and time.monotonic() < deadline, (home / "head.log").read_text()
        time.sleep(0.5)
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        # the fake GPU workers have no CUDA: torch opens NCCL only on a real GPU, and a stage
        # given a GPU torch cannot see fails unless told to use the CPU
        "RAY_LT_TORCH_BACKEND": "gloo",
        "RAY_LT_CPU_IF_NO_CUDA": "1",
    }
    sweep = [
        sys.executable,
        "-m",
        "ray_lt.sweep",
        str(ROOT / "tests" / "fixtures" / "gpu_trials.py"),
        "--address",
        f"{HEAD}:{port}",
        "--store",
        str(tmp_path / "store"),
        "--tracking-uri",
        str(tmp_path / "mlflow.db"),
    ]
    try:
        # `--gpus-per-worker auto` on the empty cluster: no GPU now, but its node types can
        # bring two, one for each of the two concurrent trials
        proc = subprocess.run(
            [sys.executable, "-c", AUTO.format(address=f"{HEAD}:{port}")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        assert "GPUS 0.0 1.0" in proc.stdout, proc.stdout
        assert "2 GPU(s) that the autoscaler can add; each stage worker gets 1 GPU" in proc.stdout

        started = time.monotonic()
        proc = subprocess.run(
            [*sweep, "--gpus-per-worker", "1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        sweep_s = time.monotonic() - started
        out = proc.stdout + proc.stderr
        (tmp_path / "sweep.log").write_text(out)
        assert proc.returncode == 0, out[-4000:]
        store = ArtifactStore(str(tmp_path / "store"))
        assert sum(k.startswith("ce-") for k in store.keys()) == 2, store.keys()
        added, _ = _autoscaler_events(temp_dir)
        assert added == 2, f"GPU workers added: {added} (two trials waited for a GPU each)"
        # the autoscaler removes idle GPU workers (6 s idle here; a cluster's default is 5 min)
        deadline = time.monotonic() + 60
        while _autoscaler_events(temp_dir)[1] < 1 and time.monotonic() < deadline:
            time.sleep(2)
        removed = _autoscaler_events(temp_dir)[1]
        assert removed >= 1, "no idle GPU worker was removed"

        print(
            f"sweep with --gpus-per-worker 1: {sweep_s:.0f} s; {added} GPU workers added, "
            f"{removed} removed when idle"
        )
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        # the fake provider's worker nodes outlive their head (the autoscaler started them
        # as processes of its own, left running at its exit): they go with the head's tree
        _kill(_processes_with_home(home))
        left = _wait_gone(home, timeout_s=10)
        if sys.exc_info()[0] is None and not left:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"Ray's logs: {temp_dir}/session_latest/logs")
    assert not left, f"processes of the test left after the cluster stopped: {left}"
