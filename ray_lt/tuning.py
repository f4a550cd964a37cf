"""The Tune side of a sweep: search algorithm, scheduler, resources per stage worker.

Optuna TPE by default, repeated once per seed with the mean shown to it; grid and random
through Tune's variant generator; ASHA on the final stage's epochs where it cannot bias what
the searcher sees. Failed configurations reach the searcher as failed trials
(``searchers.py``). A Pareto search (a tuple of metrics) uses Optuna's multi-objective TPE and
``MultiObjectiveASHA``, whose stops are printed at the end and tagged on the trials' MLflow runs
(docs/pareto.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from functools import partial
from typing import Any

from ray.tune import Callback

from ray_lt.artifacts import ArtifactStore
from ray_lt.errors import ConfigError
from ray_lt.experiment import Experiment
from ray_lt.live_view import TrialCounts
from ray_lt.spec import Resources
from ray_lt.trial import SweepSetup, run_trial, seeded_label


def build_tuner(
    exp: Experiment,
    setup: SweepSetup,
    store: ArtifactStore,
    final_epochs: int,
    cpus_per_trial: float = 0.01,
):
    """The Tune ``Tuner`` for this experiment (search algorithm, scheduler, storage)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from ray_lt.searchers import FailureAwareLimiter, SeedRepeater

    space = dict(exp.param_space)
    single = len(exp.metrics) == 1
    num_samples = exp.num_samples
    if exp.search == "optuna":
        searcher = optuna_searcher(exp)
        if len(exp.seeds) > 1:
            searcher = SeedRepeater(searcher, repeat=len(exp.seeds), set_index=True)
            num_samples *= len(exp.seeds)
        search_alg = FailureAwareLimiter(searcher, max_concurrent=exp.max_concurrent_trials)
    else:
        space["seed"] = tune.grid_search(list(exp.seeds))
        search_alg = BasicVariantGenerator(
            max_concurrent=exp.max_concurrent_trials, random_state=0
        )
    if exp.scheduler == "asha" and not uses_asha(exp):
        print(f"ray-lt: {scheduler_name(exp)} is off: {_why_no_asha(exp)}")
    scheduler = make_scheduler(exp, final_epochs) if uses_asha(exp) else None
    # the terminal's live view counts trials through this one (a no-op without a view); it is
    # always there, since ``--resume`` restores the callbacks a sweep started with
    label_of = partial(seeded_label, seeds=tuple(exp.seeds))
    callbacks: list[Any] = [TrialCounts(label_of, exp.metrics[0])]
    if not single and scheduler is not None:
        callbacks.append(StoppedTrials(scheduler, setup.tracking_uri, exp.name))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"CPU": cpus_per_trial}
    )
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=num_samples,
        # Both search algorithms above already limit concurrency; setting it here too only
        # makes Tune warn that it ignores the setting.
        max_concurrent_trials=None,
        metric=exp.metrics[0] if single else None,
        mode=exp.modes[0] if single else None,
        # A trial process imports torch and MLflow once, not once per trial. Not under ASHA: a
        # trial it stops mid-stage must take its process (and the worker group) down with it.
        reuse_actors=scheduler is None,
    )
    run_config = tune.RunConfig(
        storage_path=store.uri.rstrip("/") + "/_tune",
        name=exp.name,
        failure_config=tune.FailureConfig(max_failures=exp.max_failures),
        callbacks=callbacks,
        verbose=1,
    )
    return trainable, space, tune_config, run_config


def optuna_searcher(exp: Experiment) -> Any:
    """Optuna's TPE on one metric, or its multi-objective TPE on a tuple of metrics (TPE splits
    the observed trials by non-dominated rank there instead of by a quantile of one value)."""
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    if len(exp.metrics) == 1:
        return OptunaSearch(metric=exp.metrics[0], mode=exp.modes[0], seed=0)
    return OptunaSearch(metric=list(exp.metrics), mode=list(exp.modes), sampler=TPESampler(seed=0))


def make_scheduler(exp: Experiment, final_epochs: int) -> Any:
    """ASHA on one metric, MO-ASHA on several, over the final stage's epochs. No trial is
    stopped at its last epoch: ``max_t`` lies past it, and the last epoch's report never reaches
    the scheduler (``engine.sessions.to_scheduler``), so a rung there stops nothing."""
    from ray.tune.schedulers import ASHAScheduler

    from ray_lt.moasha import MultiObjectiveASHA

    grace = max(1, min(exp.grace_period, final_epochs))
    if len(exp.metrics) == 1:
        return ASHAScheduler(
            time_attr="epoch", max_t=final_epochs + 1, grace_period=grace, reduction_factor=2
        )
    return MultiObjectiveASHA(
        metrics=exp.metrics,
        modes=exp.modes,
        time_attr="epoch",
        max_t=max(final_epochs + 1, grace),
        grace_period=grace,
        reduction_factor=2,
    )


def uses_asha(exp: Experiment) -> bool:
    """Whether ``scheduler="asha"`` stops trials early (ASHA on one metric, MO-ASHA on several).

    Never when Optuna repeats each configuration per seed: stopping single seeds would bias the
    mean the searcher sees. A Pareto search is also left whole under a grid or random search with
    several seeds, where each seed is its own trial: MO-ASHA must not stop one seed of a
    configuration while its other seeds go on (the report averages over seeds).
    """
    if exp.scheduler != "asha":
        return False
    if len(exp.metrics) > 1:
        return len(exp.seeds) == 1
    return not (exp.search == "optuna" and len(exp.seeds) > 1)


def scheduler_name(exp: Experiment) -> str:
    return "ASHA" if len(exp.metrics) == 1 else "MO-ASHA"


def _why_no_asha(exp: Experiment) -> str:
    if exp.search == "optuna":
        return "each configuration runs once per seed and Optuna sees the mean"
    return "each configuration runs once per seed and no seed is stopped alone"


def gpu_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value:
        raise ConfigError(f"--gpus-per-worker must be 'auto' or a number >= 0, got {text!r}")
    return value


def worker_count(text: str) -> int:
    """``--num-workers``: an int >= 0 (argparse turns the error into a usage line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0 (0: train inline), got {text!r}")
    return value


def check_inline_gpus(workers: int | None, gpus: float | None) -> None:
    """``--num-workers 0`` trains on the trial's CPU: a GPU asked for beside it is a mistake."""
    if workers == 0 and gpus:
        raise ConfigError(
            f"--num-workers 0 trains every stage inline on its trial's CPU, so it cannot take "
            f"--gpus-per-worker {gpus:g}; drop one of the two"
        )


def worker_resources(
    exp: Experiment,
    gpus: float | None,
    cpus: float | None,
    cluster: dict[str, float],
    node_types: list[tuple[str, dict[str, float], int]] | None = None,
    workers: int | None = None,
) -> Resources | None:
    """Per-worker resources overriding the experiment's, or None to keep each stage's own.

    ``--gpus-per-worker auto`` (``gpus`` None) shares the cluster's GPUs among the concurrent
    trials. A cluster whose autoscaler adds GPU workers only when trials wait for them shows
    no GPU at the start, so then the GPUs its node types can bring count instead
    (``node_types``: (name, resources, most nodes); by default read from the cluster).
    ``workers`` (``--num-workers``) sets every stage's worker count; 0 trains them inline on
    the CPU, whatever GPUs the experiment asks for.
    """
    if workers == 0:
        cpus = cpus if cpus is not None else exp.resources.cpus_per_worker
        return Resources(num_workers=0, cpus_per_worker=cpus)
    if gpus is None and cpus is None:
        shared = _shared_gpus(exp, cluster, node_types)
        if shared is not None or workers is None:
            return _with_workers(shared, workers)
    return Resources(
        num_workers=workers if workers is not None else exp.resources.num_workers,
        cpus_per_worker=cpus if cpus is not None else exp.resources.cpus_per_worker,
        gpus_per_worker=gpus if gpus is not None else exp.resources.gpus_per_worker,
    )


def _with_workers(res: Resources | None, workers: int | None) -> Resources | None:
    return res if res is None or workers is None else replace(res, num_workers=workers)


def _shared_gpus(
    exp: Experiment,
    cluster: dict[str, float],
    node_types: list[tuple[str, dict[str, float], int]] | None,
) -> Resources | None:
    """``--gpus-per-worker auto``: each stage worker's share of the cluster's GPUs, or None
    when the experiment sets its own resources or no GPU is found."""
    if exp.resources.gpus_per_worker or exp.resources.inline:
        return None
    found, where = cluster.get("GPU", 0.0), "found"
    if not found:
        if node_types is None:
            from ray_lt.preflight import autoscaler_node_types

            node_types = autoscaler_node_types()
        found = scalable_gpus(node_types)
        where = "that the autoscaler can add"
    if not found:
        return None
    share = min(1.0, found / exp.max_concurrent_trials)
    print(f"ray-lt: {found:g} GPU(s) {where}; each stage worker gets {share:g} GPU")
    return Resources(cpus_per_worker=exp.resources.cpus_per_worker, gpus_per_worker=share)


def scalable_gpus(node_types: list[tuple[str, dict[str, float], int]]) -> float:
    """GPUs the node types can bring: GPUs per node times the most nodes, summed (a node type
    without a limit, -1, counts one node)."""
    return sum(res.get("GPU", 0.0) * (most if most > 0 else 1) for _, res, most in node_types)


class StoppedTrials(Callback):
    """Records what MO-ASHA stopped: each stopped trial's MLflow run gets the objectives it
    reached and ``ray_lt.stopped_by`` / ``ray_lt.stopped_at_epoch`` tags (the trial's own
    process is gone by then, so the driver writes them), and the sweep ends with one line per
    rung and the count. A tracking failure is a warning: it never costs the sweep.
    """

    def __init__(self, scheduler: Any, tracking_uri: str, experiment: str) -> None:
        self.scheduler = scheduler
        self.tracking_uri = tracking_uri
        self.experiment = experiment

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = self.scheduler.stopped().get(trial.trial_id)
        if epoch is None:
            return
        result = trial.last_result or {}
        values = {m: float(result[m]) for m in self.scheduler.metrics if m in result}
        try:
            tag_stopped(self.tracking_uri, self.experiment, trial.trial_id, epoch, values)
        except Exception as err:  # noqa: BLE001 - MLflow is a mirror; the sweep goes on
            print(f"warning: could not tag stopped trial {trial.trial_id}: {err}", file=sys.stderr)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # The sweep's console: while Tune runs, what the driver prints on ``sys.stdout`` goes to
        # the sweep's log file (ray_lt.console), and this line is ray-lt's own, for the user.
        console = sys.__stdout__ or sys.stdout
        stopped = self.scheduler.stopped()
        where = ", ".join(f"{tid} at epoch {epoch:g}" for tid, epoch in sorted(stopped.items()))
        lines = [f"MO-ASHA stopped {len(stopped)} of {len(trials)} trials early: {where}"]
        lines += [f"  {line}" for line in self.scheduler.debug_string().splitlines()[1:]]
        for line in lines:
            print(f"ray-lt: {line}", file=console, flush=True)


def tag_stopped(
    tracking_uri: str, experiment: str, trial_id: str, epoch: float, values: dict[str, float]
) -> None:
    """Tag the MLflow run of a trial MO-ASHA stopped and log the objectives it reached there."""
    from ray_lt.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment)
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`ray_lt.trial_id` = '{trial_id}'", max_results=10
    )
    for run in runs:  # the trial's run (a retried trial may have two)
        rid = run.info.run_id
        tracker.client.set_tag(rid, "ray_lt.stopped_by", "moasha")
        tracker.client.set_tag(rid, "ray_lt.stopped_at_epoch", f"{epoch:g}")
        for name, value in values.items():
            tracker.client.log_metric(rid, name, value, step=int(epoch))
