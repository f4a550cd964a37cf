"""The Tune side of a sweep: search algorithm, scheduler, resources per stage worker.

Optuna TPE by default, repeated once per seed with the mean shown to it; grid and random
through Tune's variant generator; ASHA on the final stage's epochs where it cannot bias what
the searcher sees. Failed configurations reach the searcher as failed trials
(``searchers.py``).
"""

from __future__ import annotations

from ray_lt.artifacts import ArtifactStore
from ray_lt.errors import ConfigError
from ray_lt.experiment import Experiment
from ray_lt.spec import Resources
from ray_lt.trial import SweepSetup, run_trial


def build_tuner(
    exp: Experiment,
    setup: SweepSetup,
    store: ArtifactStore,
    final_epochs: int,
    cpus_per_trial: float = 0.01,
):
    """The Tune ``Tuner`` for this experiment (search algorithm, scheduler, storage)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from ray_lt.searchers import FailureAwareLimiter, SeedRepeater

    space = dict(exp.param_space)
    single = len(exp.metrics) == 1
    num_samples = exp.num_samples
    if exp.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(
            metric=exp.metrics[0] if single else list(exp.metrics),
            mode=exp.modes[0] if single else list(exp.modes),
            seed=0,
        )
        if len(exp.seeds) > 1:
            searcher = SeedRepeater(searcher, repeat=len(exp.seeds), set_index=True)
            num_samples *= len(exp.seeds)
        search_alg = FailureAwareLimiter(searcher, max_concurrent=exp.max_concurrent_trials)
    else:
        space["seed"] = tune.grid_search(list(exp.seeds))
        search_alg = BasicVariantGenerator(
            max_concurrent=exp.max_concurrent_trials, random_state=0
        )
    scheduler = None
    if exp.scheduler == "asha" and exp.search == "optuna" and len(exp.seeds) > 1:
        print(
            "ray-lt: ASHA is off: each configuration runs once per seed and Optuna sees the mean"
        )
    if uses_asha(exp):
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=final_epochs + 1,  # never stop at the last epoch: the trial still reports
            grace_period=min(exp.grace_period, final_epochs),
            reduction_factor=2,
        )
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
        verbose=1,
    )
    return trainable, space, tune_config, run_config


def uses_asha(exp: Experiment) -> bool:
    """ASHA runs on single-objective sweeps whose configurations are not repeated per seed
    (stopping single seeds would bias the mean the searcher sees)."""
    repeated = exp.search == "optuna" and len(exp.seeds) > 1
    return exp.scheduler == "asha" and len(exp.metrics) == 1 and not repeated


def gpu_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value:
        raise ConfigError(f"--gpus-per-worker must be 'auto' or a number >= 0, got {text!r}")
    return value


def worker_resources(
    exp: Experiment, gpus: float | None, cpus: float | None, cluster: dict[str, float]
) -> Resources | None:
    """Per-worker resources overriding the experiment's, or None to keep each stage's own."""
    if gpus is None and cpus is None:
        if exp.resources.gpus_per_worker or exp.resources.inline or not cluster.get("GPU"):
            return None
        share = min(1.0, cluster["GPU"] / exp.max_concurrent_trials)
        print(f"ray-lt: {cluster['GPU']:g} GPU(s) found; each stage worker gets {share:g} GPU")
        return Resources(cpus_per_worker=exp.resources.cpus_per_worker, gpus_per_worker=share)
    return Resources(
        num_workers=exp.resources.num_workers,
        cpus_per_worker=cpus if cpus is not None else exp.resources.cpus_per_worker,
        gpus_per_worker=gpus if gpus is not None else exp.resources.gpus_per_worker,
    )
