"""What a user's mistakes and interruptions do to a sweep: each was a day-one defect.

- A configuration whose loss diverges is a failed trial for every search and seed count, and
  the sweep finishes the others and prints the cause (it used to crash Optuna's searcher).
- Resources no node can ever offer fail before any trial, in one line (they used to hang).
- Ctrl-C or SIGTERM ends the sweep within seconds with exit 130, one line with the exact
  ``--resume`` command, no lock left behind and no MLflow run left RUNNING.
All on a real local Ray, a real SQLite MLflow store and a real artifact store.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from ray_lt.errors import ERROR_KEY, ConfigError
from ray_lt.experiment import Experiment
from ray_lt.preflight import call_pipeline
from ray_lt.searchers import FailureAwareLimiter, SeedRepeater
from tests.cli import HEAD_ENV
from tests.cli import sweep_cmd as _sweep_cmd
from tests.conftest import tiny_ce
from tests.terminal import run_on_terminal

ROOT = Path(__file__).resolve().parent.parent
DIVERGE = ROOT / "tests" / "fixtures" / "diverge.py"
QUICKSTART = ROOT / "experiments" / "quickstart.py"


def _run(cmd: list[str], workdir: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        cmd,
        cwd=workdir,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _trial_runs(workdir: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], "tags.`ray_lt.role` = 'trial'", max_results=1000
    )


# --- the searcher sees a failed configuration as failed --------------------------------------


def _optuna() -> OptunaSearch:
    """Optuna as the sweep builds it; the space arrives the way Tune hands it over."""
    searcher = OptunaSearch(metric="val_overall", mode="max", seed=0)
    assert searcher.set_search_properties(None, None, {"lr": tune.choice([0.05, 0.1])})
    return searcher


def test_optuna_marks_a_failed_configuration_failed():
    from optuna.trial import TrialState

    inner = _optuna()
    limiter = FailureAwareLimiter(inner, max_concurrent=4)
    for trial in ("a", "b", "c"):
        assert limiter.suggest(trial) is not None
    limiter.on_trial_result("a", {"training_iteration": 1, "loss": 2.0})  # no evaluation
    limiter.on_trial_result("a", {ERROR_KEY: "non-finite loss", "seed": 0})
    limiter.on_trial_complete("a", {ERROR_KEY: "non-finite loss", "seed": 0})
    limiter.on_trial_result("b", {"training_iteration": 1, "val_overall": 0.4})
    limiter.on_trial_complete("b", {"val_overall": 0.5, "seed": 0})
    limiter.on_trial_complete("c", None, error=True)  # a process that died for good
    states = [t.state for t in inner._ot_study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert inner._ot_study.trials[1].value == 0.5


def test_a_failed_seed_fails_its_configuration():
    from optuna.trial import TrialState

    inner = _optuna()
    limiter = FailureAwareLimiter(SeedRepeater(inner, repeat=2), max_concurrent=4)
    configs = [limiter.suggest(t) for t in ("a1", "a2", "b1", "b2")]
    assert configs[0]["lr"] == configs[1]["lr"] and configs[2]["lr"] == configs[3]["lr"]
    limiter.on_trial_complete("a1", {"val_overall": 0.5})
    limiter.on_trial_complete("a2", {ERROR_KEY: "non-finite loss"})
    limiter.on_trial_complete("b1", {"val_overall": 0.5})
    limiter.on_trial_complete("b2", {"val_overall": 0.25})
    trials = inner._ot_study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].value == pytest.approx(0.375)  # the mean over the seeds


# Optuna takes one path with one seed (ASHA on) and another with several (each configuration
# repeated per seed, ASHA off). Grid and random search share one path, the seeds being a grid
# dimension for both: each runs with one seed count, the two together cover both.
@pytest.mark.ray
@pytest.mark.parametrize(
    "search, seeds", [("optuna", "0"), ("optuna", "0,1"), ("grid", "0,1"), ("random", "0")]
)
def test_diverged_configuration_fails_its_trials_and_the_sweep_goes_on(
    tmp_path, ray_head, search, seeds
):
    env = {**HEAD_ENV, "RAY_LT_TEST_SEARCH": search, "RAY_LT_TEST_SEEDS": seeds}
    proc = _run(_sweep_cmd(DIVERGE, tmp_path, head=ray_head), tmp_path, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "KeyError" not in out, out[-4000:]
    summary = proc.stdout.split("\nsweep '")[-1]
    lines = [ln for ln in summary.splitlines() if ln.startswith("  ")]
    errors = [ln for ln in lines if ln.lstrip().startswith("ERROR")]
    assert errors and all("non-finite loss" in ln for ln in errors)
    assert all("lower the learning rate" in ln for ln in errors)
    assert any(ln.lstrip().startswith("OK") for ln in lines), summary
    assert "seed=None" not in summary
    assert {f"seed={s}" for s in seeds.split(",")} <= {ln.split()[2] for ln in lines}
    asha = search != "optuna" or seeds == "0"  # ASHA is off when Optuna repeats per seed
    assert ("STOP = stopped early by ASHA" in summary) == asha
    assert "will be ignored" not in out  # Tune's warning about a setting the user never made


# --- resources that no node can offer ----------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize(
    "extra, expected",
    [
        (("--gpus-per-worker", "1"), "stage 'ce' asks for 1 CPU, 1 GPU per worker"),
        (("--num-cpus", "0"), "every trial asks for 0.01 CPU"),
    ],
)
def test_impossible_resources_fail_before_any_trial(tmp_path, extra, expected):
    cmd = _sweep_cmd(QUICKSTART, tmp_path, "--smoke")
    if extra[0] == "--num-cpus":
        cmd = cmd[: cmd.index("--num-cpus")] + list(extra)
    else:
        cmd += list(extra)
    proc = _run(cmd, tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "no node of this cluster can ever offer" in errors[0]
    assert "Traceback" not in proc.stderr
    assert _trial_runs(tmp_path, "quickstart-smoke") == []  # no trial started
    assert not (tmp_path / "store" / "_locks").exists() or not any(
        (tmp_path / "store" / "_locks").iterdir()
    )


# --- a pipeline that reads an undefined config key ---------------------------------------------


def test_pipeline_reading_an_undefined_key_names_it_and_the_defined_ones():
    exp = Experiment(
        name="typo",
        pipeline=lambda config: tiny_ce(lr=config["learning_rate"]),
        param_space={"lr": tune.choice([0.1])},
    )
    with pytest.raises(ConfigError) as err:
        call_pipeline(exp, {"lr": 0.1, "seed": 0, "__trial_index__": 0})
    text = str(err.value)
    assert "config['learning_rate']" in text and "defined: lr, seed" in text
    assert "__trial_index__" not in text and "\n" not in text


# --- Ctrl-C and SIGTERM ------------------------------------------------------------------------


def _start_and_interrupt(workdir: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the quickstart smoke sweep, send ``sig`` once a stage is training, wait for it."""
    cmd = _sweep_cmd(QUICKSTART, workdir, "--smoke")
    proc = subprocess.Popen(
        cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    locks = workdir / "store" / "_locks"
    deadline = time.monotonic() + 300
    while not (locks.exists() and any(p.suffix == ".lock" for p in locks.iterdir())):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no stage started training"
        time.sleep(0.2)
    time.sleep(3)  # into the stage's training, as a user's Ctrl-C would be
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _interrupt_on_a_terminal(workdir: Path) -> subprocess.CompletedProcess:
    """The quickstart smoke sweep on a pseudo-terminal, Ctrl-C once a stage trains."""
    cmd = _sweep_cmd(QUICKSTART, workdir, "--smoke")
    locks = workdir / "store" / "_locks"
    seen: list[float] = []

    def training(screen: str) -> bool:
        if not seen and locks.exists() and any(p.suffix == ".lock" for p in locks.iterdir()):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 3  # into the stage's training

    run = run_on_terminal(cmd, workdir, timeout=420, interrupt_when=training)
    assert seen, "no stage started training"
    return subprocess.CompletedProcess(cmd, run.returncode, run.screen, run.stderr)


def _assert_clean_interrupt(workdir: Path, proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 130, out[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ray-lt: interrupted")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert f"resume with: python -m ray_lt.sweep {QUICKSTART} --store" in lines[0]
    assert lines[0].endswith("--num-cpus 2 --smoke --resume")
    assert "stopped early" not in out and "Tuner.restore" not in out
    assert "every trial" not in out and "Traceback" not in out, out[-4000:]
    locks = workdir / "store" / "_locks"
    assert not locks.exists() or [p.name for p in locks.iterdir()] == []
    statuses = [r.info.status for r in _trial_runs(workdir, "quickstart-smoke")]
    assert statuses and "RUNNING" not in statuses, statuses


def _sweep_runs(workdir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart-smoke")
    return client.search_runs([exp.experiment_id], "tags.`ray_lt.role` = 'sweep'")


def _assert_hierarchy(workdir: Path) -> str:
    """One sweep run, FINISHED, over every trial run, each over its stage runs; a trained
    stage's run lasts at least its epochs' training time. Returns the sweep run's id."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (sweep,) = _sweep_runs(workdir)
    assert sweep.info.status == "FINISHED" and sweep.data.tags["ray_lt.resumed"] == "1"
    trials = _trial_runs(workdir, "quickstart-smoke")
    assert {t.data.tags.get("mlflow.parentRunId") for t in trials} == {sweep.info.run_id}
    assert sweep.data.metrics["trials"] == len(trials)
    where = "tags.`ray_lt.role` = 'stage'"
    stages = client.search_runs([sweep.info.experiment_id], where, max_results=1000)
    assert {s.data.tags["mlflow.parentRunId"] for s in stages} <= {t.info.run_id for t in trials}
    for stage in stages:
        if stage.data.tags["ray_lt.reused"] == "false":
            key = stage.data.tags["ray_lt.stage_key"]
            metrics = json.loads((workdir / "store" / key / "metrics.json").read_text())
            trained_s = sum(h.get("epoch_s", 0.0) for h in metrics["history"])
            assert stage.info.end_time - stage.info.start_time >= trained_s * 1000, key
    return sweep.info.run_id


@pytest.mark.ray
def test_ctrl_c_ends_the_sweep_cleanly_and_resume_finishes_it(tmp_path):
    # at a terminal, as a user presses Ctrl-C: the live view is on (SIGTERM's test has a pipe)
    proc = _interrupt_on_a_terminal(tmp_path)
    assert "ray-lt quickstart-smoke: " in proc.stdout  # the view was drawn before Ctrl-C
    _assert_clean_interrupt(tmp_path, proc)
    assert [r.info.status for r in _sweep_runs(tmp_path)] == ["KILLED"]
    resumed = _run(_sweep_cmd(QUICKSTART, tmp_path, "--smoke", "--resume"), tmp_path)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    summary = resumed.stdout.split("\nsweep '")[-1]
    assert summary.startswith("quickstart-smoke': 2 trials"), summary
    assert summary.count("  OK ") + summary.count("  STOP ") == 2, summary  # ASHA may stop one
    statuses = [r.info.status for r in _trial_runs(tmp_path, "quickstart-smoke")]
    assert "FINISHED" in statuses and "RUNNING" not in statuses, statuses
    sweep = _assert_hierarchy(tmp_path)  # the resumed sweep continued the same sweep run
    from mlflow.tracking import MlflowClient

    from ray_lt.report import main as report_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = str(tmp_path / "report")
    assert report_main([str(QUICKSTART), "--smoke", "--tracking-uri", uri, "--out", out]) == 0
    files = {a.path for a in MlflowClient(uri).list_artifacts(sweep, "report")}
    assert "report/index.html" in files and "report/table.md" in files


@pytest.mark.ray
def test_sigterm_ends_the_sweep_cleanly(tmp_path):
    _assert_clean_interrupt(tmp_path, _start_and_interrupt(tmp_path, signal.SIGTERM))


# --- two Ray instances on one machine ----------------------------------------------------------


@pytest.fixture(scope="module")
def beside(tmp_path_factory, ray_head):
    """The quickstart smoke sweep with ``--verbose``, in a Ray of its own beside ``ray_head`` (the
    other instance: a `ray start`, as another sweep's Ray would be). One sweep serves both tests
    below: a verbose console shows everything Ray prints, so it is also where a word of Ray's
    about the other instance would show."""
    workdir = tmp_path_factory.mktemp("beside")
    proc = _run(_sweep_cmd(QUICKSTART, workdir, "--smoke", "--verbose"), workdir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return proc


@pytest.mark.ray
def test_a_sweep_beside_another_ray_instance_talks_only_to_its_own(beside):
    out = beside.stdout + beside.stderr
    assert "another Ray instance runs on this machine" in beside.stdout
    assert "Found multiple active Ray instances" not in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]


@pytest.mark.ray
def test_verbose_keeps_rays_worker_output_on_the_console(beside):
    out = beside.stdout + beside.stderr
    assert "goes to" not in beside.stdout  # nothing routed to a file
    # each trial's lines and its stage workers' under Ray's "(name pid=N)" prefix
    assert re.search(r"\(run_trial pid=\d+\)\S* \[ray-lt\] ", out), out[-4000:]
    assert re.search(r"\(RayTrainWorker pid=\d+\)", out), out[-4000:]
