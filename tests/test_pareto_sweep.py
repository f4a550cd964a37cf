"""The Pareto search: how a tuple metric is wired (multi-objective TPE, MO-ASHA, seeds), what bad
objectives say, and experiments/pareto_cbe.py --smoke end to end on a real local Ray, a real
SQLite MLflow store and a real artifact store, run by the CLI as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.samplers import TPESampler
from optuna.trial import TrialState
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

from ray_lt.artifacts import ArtifactStore
from ray_lt.errors import ConfigError
from ray_lt.experiment import Experiment
from ray_lt.moasha import MultiObjectiveASHA
from ray_lt.searchers import FailureAwareLimiter, SeedRepeater
from ray_lt.tracking import Tracker
from ray_lt.trial import SweepSetup
from ray_lt.tuning import StoppedTrials, build_tuner, optuna_searcher, uses_asha
from tests.cli import HEAD_ENV, INLINE, ray_args
from tests.conftest import tiny_ce

ROOT = Path(__file__).resolve().parent.parent
PARETO = ("val_overall", "val_few")


def _pipeline(config):
    return tiny_ce()


def _experiment(**changes) -> Experiment:
    fields = {
        "name": "pareto-test",
        "pipeline": _pipeline,
        "param_space": {"lr": tune.choice([0.01, 0.1])},
        "metric": PARETO,
        "mode": ("max", "max"),
        "num_samples": 3,
    }
    return Experiment(**{**fields, **changes})


def _tuner_parts(exp: Experiment, tmp_path: Path):
    setup = SweepSetup(exp, str(tmp_path), f"sqlite:///{tmp_path}/m.db", None, {}, True, None)
    _, space, tune_config, run_config = build_tuner(exp, setup, ArtifactStore(tmp_path), 5)
    return space, tune_config, run_config


# --- wiring -----------------------------------------------------------------------------------


def test_pareto_search_gets_multi_objective_tpe_and_moasha(tmp_path):
    space, tune_config, run_config = _tuner_parts(_experiment(), tmp_path)
    sched = tune_config.scheduler
    assert isinstance(sched, MultiObjectiveASHA)
    assert sched.metrics == list(PARETO) and sched.modes == ["max", "max"]
    assert sched.milestones == [1, 2, 4]  # 5 epochs, max_t 6: never stopped at the last epoch
    # Tune gets no single metric (the scheduler and the searcher hold the tuple) ...
    assert tune_config.metric is None and tune_config.mode is None
    assert tune_config.num_samples == 3 and tune_config.reuse_actors is False
    # ... and the searcher is Optuna's TPE over both objectives.
    searcher = tune_config.search_alg.searcher
    assert searcher.metric == list(PARETO) and searcher.mode == ["max", "max"]
    # the live view's trial counts (always there), then the record of MO-ASHA's stops
    assert [type(cb).__name__ for cb in run_config.callbacks] == ["TrialCounts", "StoppedTrials"]
    single = _tuner_parts(_experiment(metric="val_overall", mode="max"), tmp_path)[1]
    assert isinstance(single.scheduler, ASHAScheduler)


def _searcher(exp: Experiment):
    """The sweep's Optuna searcher, with the space handed over the way Tune does."""
    inner = optuna_searcher(exp)
    assert inner.set_search_properties(None, None, dict(exp.param_space))
    return inner


def test_multi_objective_tpe_tells_optuna_both_values():
    inner = _searcher(_experiment())
    limiter = FailureAwareLimiter(inner, max_concurrent=4)
    configs = [limiter.suggest(t) for t in ("a", "b")]
    assert all(c["lr"] in (0.01, 0.1) for c in configs)
    limiter.on_trial_complete("a", {"val_overall": 0.5, "val_few": 0.2})
    limiter.on_trial_complete("b", {"val_overall": 0.4})  # one objective missing: failed
    study = inner._ot_study
    assert isinstance(study.sampler, TPESampler)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[0].values == [0.5, 0.2]


def test_seed_repeats_show_the_searcher_the_mean_vector():
    inner = _searcher(_experiment(seeds=(0, 1)))
    limiter = FailureAwareLimiter(SeedRepeater(inner, repeat=2), max_concurrent=4)
    for tid in ("a1", "a2"):
        limiter.suggest(tid)
    limiter.on_trial_complete("a1", {"val_overall": 0.5, "val_few": 0.2})
    limiter.on_trial_complete("a2", {"val_overall": 0.3, "val_few": 0.4})
    assert inner._ot_study.trials[0].values == pytest.approx([0.4, 0.3])


@pytest.mark.parametrize(
    "changes, on",
    [
        ({}, True),
        ({"seeds": (0, 1)}, False),  # Optuna repeats per seed: stopping one would bias the mean
        ({"seeds": (0, 1), "search": "grid", "param_space": {"lr": 0.1}}, False),
        ({"search": "grid", "param_space": {"lr": 0.1}}, True),
        ({"scheduler": None}, False),
    ],
)
def test_moasha_never_stops_single_seeds(tmp_path, capsys, changes, on):
    exp = _experiment(**changes)
    assert uses_asha(exp) is on
    sched = _tuner_parts(exp, tmp_path)[1].scheduler
    assert isinstance(sched, MultiObjectiveASHA) if on else sched is None
    said = "MO-ASHA is off: each configuration runs once per seed" in capsys.readouterr().out
    assert said == (not on and exp.scheduler == "asha")


def test_single_objective_asha_keeps_its_seed_rules():
    # Unchanged: ASHA is on for a grid over seeds, off when Optuna repeats per seed.
    one = {"metric": "val_overall", "mode": "max", "seeds": (0, 1)}
    assert uses_asha(_experiment(**one, search="grid"))
    assert not uses_asha(_experiment(**one))


def test_stopped_trials_are_tagged_in_mlflow_and_printed(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = Tracker(uri, "pareto-test")
    run_ids = {t: tracker.start_trial(t, {"lr": 0.1}, smoke=True) for t in "AB"}
    sched = MultiObjectiveASHA(metrics=PARETO, modes=("max", "max"), max_t=6)
    trials = {t: Trial("__fake", trial_id=t, stub=True) for t in "AB"}
    results = {
        "A": {"epoch": 1, "val_overall": 0.6, "val_few": 0.3},
        "B": {"epoch": 1, "val_overall": 0.5, "val_few": 0.2},  # dominated by A
    }
    recorder = StoppedTrials(sched, uri, "pareto-test")
    for tid, trial in trials.items():
        sched.on_trial_add(None, trial)
        trial.update_last_result(dict(results[tid]))
        sched.on_trial_result(None, trial, dict(results[tid]))
        recorder.on_trial_complete(0, list(trials.values()), trial)
    recorder.on_experiment_end(list(trials.values()))
    out = capfd.readouterr().out  # the console itself, not sys.stdout (see StoppedTrials)
    assert "MO-ASHA stopped 1 of 2 trials early: B at epoch 1" in out
    assert "Rung epoch=1: 2 recorded, 1 non-dominated" in out
    stopped, kept = (tracker.client.get_run(run_ids[t]).data for t in "BA")
    assert stopped.tags["ray_lt.stopped_by"] == "moasha"
    assert stopped.tags["ray_lt.stopped_at_epoch"] == "1"
    assert stopped.metrics == {"val_overall": 0.5, "val_few": 0.2}
    history = tracker.client.get_metric_history(run_ids["B"], "val_few")
    assert [(m.step, m.value) for m in history] == [(1, 0.2)]
    assert "ray_lt.stopped_by" not in kept.tags and not kept.metrics


def test_an_unreachable_tracking_server_only_warns(capsys):
    sched = MultiObjectiveASHA(metrics=PARETO, modes=("max", "max"), max_t=6)
    trial = Trial("__fake", trial_id="B", stub=True)
    sched.on_trial_add(None, trial)
    sched.on_trial_result(None, trial, {"epoch": 1, "val_overall": 0.6, "val_few": 0.3})
    other = Trial("__fake", trial_id="C", stub=True)
    sched.on_trial_add(None, other)
    sched.on_trial_result(None, other, {"epoch": 1, "val_overall": 0.1, "val_few": 0.1})
    assert sched.stopped() == {"C": 1.0}
    StoppedTrials(sched, "http://127.0.0.1:9", "x").on_trial_complete(0, [other], other)
    err = capsys.readouterr().err
    assert err.startswith("warning: could not tag stopped trial C:") and err.count("\n") == 1


# --- bad objectives ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"metric": ("val_overall",), "mode": ("max",)}, "names 1 objective(s)"),
        ({"metric": (), "mode": "max"}, "names 0 objective(s)"),
        ({"metric": ("val_overall", "val_overall")}, "distinct, non-empty names"),
        ({"metric": ("val_overall", "")}, "distinct, non-empty names"),
        ({"metric": PARETO, "mode": ("max", "max", "min")}, "gives 3 modes for the 2 metrics"),
        ({"metric": "val_overall", "mode": ("max", "max")}, "gives 2 modes for the 1 metrics"),
        ({"metric": PARETO, "mode": ("max", "maximize")}, "must be 'max' or 'min'"),
        ({"metric": 3}, "must be a name or a tuple of names"),
    ],
)
def test_bad_objectives_fail_in_one_line(changes, message):
    with pytest.raises(ConfigError) as err:
        _experiment(**changes)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_one_metric_pareto_file_exits_2_before_ray(tmp_path):
    file = tmp_path / "one_metric.py"
    file.write_text(
        "from ray_lt.experiment import Experiment\n"
        "from tests.conftest import tiny_ce\n"
        "experiment = Experiment(name='x', pipeline=lambda c: tiny_ce(), "
        "metric=('val_overall',), mode=('max', 'max'), scheduler='asha')\n"
    )
    proc = _sweep(file, tmp_path, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "names 1 objective(s)" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store" / "_tune").exists()


# --- end to end -------------------------------------------------------------------------------


def _sweep(
    file: Path, workdir: Path, *extra: str, timeout: int, head: str | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(HEAD_ENV if head else {})}
    cmd = [sys.executable, "-m", "ray_lt.sweep", str(file), "--store", str(workdir / "store"),
           "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", *extra]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    (workdir / "sweep.log").write_text(proc.stdout + proc.stderr)
    return proc


def _trial_runs(workdir: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], "tags.`ray_lt.role` = 'trial'", max_results=1000
    )


@pytest.mark.ray
@pytest.mark.timeout(1800)  # about 5 minutes on 2 idle cores; far more on a shared machine
def test_pareto_cbe_smoke_sweep(tmp_path, ray_head):
    file = ROOT / "experiments" / "pareto_cbe.py"
    extra = ("--smoke", *ray_args(ray_head), *INLINE)
    proc = _sweep(file, tmp_path, *extra, timeout=1700, head=ray_head)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    said = re.search(r"MO-ASHA stopped (\d+) of (\d+) trials early", proc.stdout)
    assert said, proc.stdout[-3000:]
    n_stopped, n_trials = int(said[1]), int(said[2])
    assert n_trials == 4
    summary = proc.stdout.split("\nsweep '")[-1]
    lines = [ln.split()[0] for ln in summary.splitlines() if ln.startswith("  ")]
    assert len(lines) == 4 and lines.count("STOP") == n_stopped, summary
    assert lines.count("OK") == 4 - n_stopped, summary  # no trial failed
    runs = _trial_runs(tmp_path, "pareto_cbe-smoke")
    assert len(runs) == 4
    for run in runs:  # both objectives for every trial, stopped or finished
        assert {"val_overall", "val_few"} <= set(run.data.metrics), run.data.tags
    stopped = [r for r in runs if r.data.tags.get("ray_lt.stopped_by") == "moasha"]
    assert len(stopped) == n_stopped
    assert all(r.data.tags["ray_lt.stopped_at_epoch"] in ("1", "2", "4") for r in stopped)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 4 - n_stopped
    assert {r.info.run_id for r in finished}.isdisjoint(r.info.run_id for r in stopped)
    # The scheduler ran on the calibration's epochs: every rung saw a trial, and the run
    # stopped at least one dominated configuration.
    assert re.search(r"Rung epoch=1: [1-4] recorded", proc.stdout), proc.stdout[-3000:]
    assert n_stopped >= 1, proc.stdout[-3000:]
