"""``python -m ray_lt.sweep FILE``: run an experiment's sweep with Ray Tune, tracked in MLflow.

The driver validates everything it can before Ray starts (experiment file, search space, stage,
dataset and model names, the data folder, the tracking store), puts each dataset in the object
store once, then hands trials to Tune: Optuna TPE by default (repeated once per seed), grid for
seed sweeps, ASHA on the final stage's epochs. Each trial runs its pipeline (``pipeline.py``).
``--resume`` continues an interrupted sweep: finished trials are not re-run and finished stages
are reused from the store.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from ray_lt.artifacts import Artifact, ArtifactStore
from ray_lt.errors import ERROR_KEY, ConfigError, RayLtError
from ray_lt.experiment import Experiment, load_experiment, project_root
from ray_lt.interrupts import (
    EXIT_INTERRUPTED,
    Interrupts,
    SweepInterrupted,
    after_interrupt,
    quiet_tune_interrupt_lines,
)
from ray_lt.preflight import call_pipeline, check_pipeline, check_resources, check_space
from ray_lt.spec import Resources, StageSpec, walk, with_resources
from ray_lt.tracking import Tracker, default_tracking_uri, normalize_uri
from ray_lt.tracking_server import free_port

TRIAL_INDEX = "__trial_index__"
# MLflow's HTTP client retries for minutes by default; a sweep should notice a lost server fast
# and keep going (the mirror keeps what it could not write). Users may set their own values.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


@dataclass
class SweepSetup:
    """What every trial receives (once, through the object store)."""

    experiment: Experiment
    store_uri: str
    tracking_uri: str
    data_root: str | None
    data_refs: dict[Any, Any]
    smoke: bool
    resources: Resources | None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ray_lt.sweep", description=__doc__.splitlines()[0])
    p.add_argument("file", help="experiment file (Python) defining `experiment = Experiment(...)`")
    p.add_argument("--smoke", action="store_true", help="run the experiment's smoke variant")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite ./mlflow.db)")
    p.add_argument("--store", help="artifact store: a local path or a pyarrow.fs URI")
    p.add_argument("--address", help="Ray cluster address (default: start Ray in-process)")
    p.add_argument("--data-root", help="dataset root (default: $RAY_LT_DATA)")
    p.add_argument("--num-cpus", type=int, help="CPUs for an in-process Ray")
    p.add_argument(
        "--gpus-per-worker",
        default="auto",
        help="GPU fraction per stage worker; 'auto' (default): when the cluster has GPUs and the "
        "experiment sets none, share them among the concurrent trials",
    )
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per stage worker")
    return p.parse_args(argv)


def _abs(path_or_uri: str) -> str:
    return path_or_uri if "://" in path_or_uri else os.path.abspath(path_or_uri)


def _trial(config: dict[str, Any], setup: SweepSetup) -> None:
    """One Tune trial: one configuration with one seed, its whole pipeline.

    A ``RayLtError`` (a diverged loss, a bad config) is a result of the configuration: the trial
    reports it and ends, and Tune does not retry it. Anything else (a lost node, a killed
    process) propagates, and Tune retries the trial up to ``Experiment.max_failures`` times; the
    retry reuses finished stages and resumes the unfinished one from its last checkpoint.
    """
    from ray import tune

    from ray_lt.mirror import TrialMirror
    from ray_lt.pipeline import TrialContext, run_pipeline

    exp = setup.experiment
    config = dict(config)
    index = config.pop(TRIAL_INDEX, None)
    config.setdefault("seed", exp.seeds[int(index or 0) % len(exp.seeds)])
    store = ArtifactStore(setup.store_uri)
    trial_id = tune.get_context().get_trial_id()
    mirror = TrialMirror(setup.tracking_uri, exp.name, store, trial_id, config, setup.smoke)
    try:
        final = apply_resources(call_pipeline(exp, config), exp, setup.resources)
        done = store.lookup(final.key) if mirror.finished_before else None
        if done is not None:  # finished and tracked before the driver died: report, run nothing
            tune.report({**_result(done), "artifact": done.key, "seed": config["seed"]})
            return
        ctx = TrialContext(
            store_uri=setup.store_uri,
            data_refs=dict(setup.data_refs),
            data_root=setup.data_root,
            mirror=mirror,
            report_to_tune=True,
        )
        artifact = run_pipeline(final, ctx)[-1].artifact
        result = _result(artifact)
        mirror.finish(result, artifact.key)
    except RayLtError as err:
        mirror.fail(err)
        tune.report({ERROR_KEY: " ".join(str(err).split())[:500], "seed": config["seed"]})
        return
    except BaseException as err:
        mirror.fail(err)
        raise
    tune.report({**result, "artifact": artifact.key, "seed": config["seed"]})


def _result(artifact: Artifact) -> dict[str, float]:
    """What a trial reports: the final stage's test metrics and ``val_*`` metrics."""
    metrics = artifact.metrics()
    result = dict(metrics.get("test", {}))
    result.update({f"val_{k}": v for k, v in metrics.get("val", {}).items()})
    return result


def apply_resources(final: StageSpec, exp: Experiment, override: Resources | None) -> StageSpec:
    """The DAG with the command line's resources, else the experiment's where a stage kept the
    default."""
    if override is not None:
        return with_resources(final, override, only_default=False)
    if exp.resources != Resources():
        return with_resources(final, exp.resources)
    return final


def trial_cpus(stages: list[StageSpec]) -> float:
    """CPUs a trial reserves: a token 0.01 while its stages run in ``TorchTrainer`` workers
    (which reserve their own), the CPUs of its largest inline stage when it computes itself."""
    return max([0.01] + [s.resources.cpus_per_worker for s in stages if s.resources.inline])


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
        tune.with_parameters(_trial, setup=setup), {"CPU": cpus_per_trial}
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


def run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    exp = load_experiment(args.file, smoke=args.smoke)
    check_space(exp)
    data_root = args.data_root or exp.data_root or os.environ.get("RAY_LT_DATA")
    data_root = os.path.abspath(data_root) if data_root else None
    stages = check_pipeline(exp, data_root)
    store = ArtifactStore(_abs(args.store or exp.store))
    tracking_uri = normalize_uri(args.tracking_uri or exp.tracking_uri or default_tracking_uri())
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    Tracker(tracking_uri, exp.name)  # fails here, in one line, when the store is unreachable
    if args.resume:
        _replay(store, tracking_uri, exp.name)
    gpus = None if args.gpus_per_worker == "auto" else _fraction(args.gpus_per_worker)
    interrupts = Interrupts()
    try:
        with interrupts.installed():
            results = _run_tune(
                args, exp, stages, store, tracking_uri, data_root, gpus, interrupts
            )
    except SweepInterrupted:
        results = None
    if interrupts.received:
        return after_interrupt(exp.name, store, tracking_uri, interrupts, argv)
    _replay(store, tracking_uri, exp.name)
    return summarize(exp, results, tracking_uri)


def _run_tune(
    args: argparse.Namespace,
    exp: Experiment,
    stages: list[StageSpec],
    store: ArtifactStore,
    tracking_uri: str,
    data_root: str | None,
    gpus: float | None,
    interrupts: Interrupts,
) -> Any:
    """Start (or join) Ray, check resources, run the Tuner; Ray is shut down on the way out."""
    import ray
    import ray.cloudpickle
    from ray import tune

    from ray_lt.data import load_dataset

    module = sys.modules.get(exp.pipeline.__module__)
    if module is not None and module.__name__.startswith("ray_lt_experiment_"):
        ray.cloudpickle.register_pickle_by_value(module)  # the file is not importable remotely
    started = not ray.is_initialized()
    if started:
        init_kwargs = _ray_init_kwargs(args.address)
        env = _worker_env(args.file, tracking_uri, data_root)
        if not args.address:
            _say_if_shared()
            # Ray's state API (Train's placement-group cleaner uses it) finds "its" cluster by
            # looking for running instances; with two on this machine it fails with "Found
            # multiple active Ray instances". Point it at this sweep's own dashboard.
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{init_kwargs['dashboard_port']}"
        ray.init(
            num_cpus=args.num_cpus if not args.address else None,
            runtime_env={"env_vars": env},
            logging_level=logging.WARNING,
            **init_kwargs,
        )
    try:
        resources = _resources(exp, gpus, args.cpus_per_worker, ray.cluster_resources())
        sample = walk(apply_resources(stages[-1], exp, resources))
        check_resources(sample, trial_cpus(sample))
        refs = {s.data: ray.put(load_dataset(s.data, data_root)) for s in stages}
        setup = SweepSetup(exp, store.uri, tracking_uri, data_root, refs, args.smoke, resources)
        trainable, space, tune_config, run_config = build_tuner(
            exp, setup, store, stages[-1].train.epochs, trial_cpus(sample)
        )
        path = f"{run_config.storage_path}/{exp.name}"
        if args.resume:
            if not tune.Tuner.can_restore(path):
                raise RayLtError(
                    f"nothing to resume at {path}; run without --resume to start the sweep"
                )
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space, tune_config=tune_config, run_config=run_config
            )
        quiet_tune_interrupt_lines()
        with interrupts.tune_running():
            return tuner.fit()
    finally:
        if started:
            ray.shutdown()


def _worker_env(file: str, tracking_uri: str, data_root: str | None) -> dict[str, str]:
    """Environment variables of every Ray worker of an in-process Ray."""
    root = project_root(file)
    env = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    }
    # Stages evaluate every ``eval_every`` epochs, so some reports carry no metric; ASHA skips
    # those, and Tune's strict check would fail the trial on them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    env["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    env.update(
        {k: v for k, v in os.environ.items() if k.startswith(("RAY_LT_", "MLFLOW_HTTP_REQUEST_"))}
    )
    if data_root:
        env["RAY_LT_DATA"] = data_root
    return env


def _ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """``ray.init`` arguments: the cluster at ``address``, else a new in-process Ray (never a
    cluster some other ``ray start`` left on this machine). Its dashboard is on: Ray Train's
    clean-up of a stopped trial's workers asks the state API, which the dashboard serves. It
    listens on 127.0.0.1 only, on a free port chosen here so the workers can be told where."""
    if address:
        return {"address": address}
    return {
        "address": "local",
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(),
    }


def _say_if_shared() -> None:
    """Tell the user when another Ray instance already runs on this machine."""
    from ray._private.services import find_gcs_addresses

    others = find_gcs_addresses()
    if others:
        print(
            f"ray-lt: another Ray instance runs on this machine ({', '.join(sorted(others))}); "
            "this sweep starts its own beside it and they share the CPUs"
        )


def _replay(store: ArtifactStore, tracking_uri: str, experiment: str) -> None:
    """Mirror to MLflow what trials kept in the store while the server was unreachable."""
    from ray_lt.mirror import replay_outbox

    try:
        done, left = replay_outbox(store, tracking_uri, experiment)
    except RayLtError as err:
        print(f"warning: {err}; run again with --resume to mirror the rest", file=sys.stderr)
        return
    if done:
        print(f"ray-lt: mirrored {done} trial(s) kept while MLflow was unreachable")
    if left:
        print(
            f"warning: {left} trial(s) are still not in MLflow; run again with --resume",
            file=sys.stderr,
        )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value:
        raise ConfigError(f"--gpus-per-worker must be 'auto' or a number >= 0, got {text!r}")
    return value


def _resources(
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


def summarize(exp: Experiment, results: Any, tracking_uri: str) -> int:
    """Print one line per trial; exit 0 when at least one trial finished."""
    metric = exp.metrics[0]
    asha = uses_asha(exp)
    legend = "; STOP = stopped early by ASHA" if asha else ""
    print(
        f"\nsweep '{exp.name}': {len(results)} trials (metric {metric}, mode {exp.modes[0]}"
        f"{legend})"
    )
    ok = 0
    for result in results:
        line, finished = _trial_line(exp, result, metric, asha)
        ok += finished
        print(line)
    try:
        trial_ids = [r.metrics.get("trial_id") for r in results if r.metrics]
        closed = Tracker(tracking_uri, exp.name).close_unfinished([t for t in trial_ids if t])
        if closed:
            print(f"{closed} unfinished trial run(s) marked KILLED in MLflow")
    except RayLtError as err:
        print(f"warning: {err}", file=sys.stderr)
    print(f"MLflow: {tracking_uri}  (mlflow ui --backend-store-uri {tracking_uri})")
    if ok == 0:
        print(f"error: every trial of '{exp.name}' failed; see the reasons above", file=sys.stderr)
        return 1
    return 0


def _trial_line(exp: Experiment, result: Any, metric: str, asha: bool) -> tuple[str, bool]:
    """One summary line, and whether the trial finished with a metric."""
    metrics = result.metrics or {}
    cfg = {k: v for k, v in (result.config or {}).items() if not k.startswith("__")}
    value = metrics.get(metric)
    failed = metrics.get(ERROR_KEY)
    # a trial's last report carries "artifact" only when its whole pipeline finished
    if result.error or failed:
        status = "ERROR"
    elif "artifact" in metrics:
        status = "OK"
    else:
        status = "STOP" if asha else "ENDED"  # stopped by ASHA, or ended without finishing
    shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else value
    reason = f"  ({str(result.error).splitlines()[-1][:160]})" if result.error else ""
    reason = f"  ({failed[:300]})" if failed else reason
    cfg.pop("seed", None)
    line = f"  {status:5s} {metric}={shown}  seed={_seed_of(exp, result)} {cfg}{reason}"
    return line, result.error is None and value is not None


def _seed_of(exp: Experiment, result: Any) -> Any:
    """The trial's seed: reported by the trial, else from Tune's repeat index or grid config."""
    seed = (result.metrics or {}).get("seed")
    if seed is not None:
        return seed
    config = result.config or {}
    index = config.get(TRIAL_INDEX)
    if index is not None:
        return exp.seeds[int(index) % len(exp.seeds)]
    return config.get("seed", exp.seeds[0] if len(exp.seeds) == 1 else None)


def uses_asha(exp: Experiment) -> bool:
    """ASHA runs on single-objective sweeps whose configurations are not repeated per seed
    (stopping single seeds would bias the mean the searcher sees)."""
    repeated = exp.search == "optuna" and len(exp.seeds) > 1
    return exp.scheduler == "asha" and len(exp.metrics) == 1 and not repeated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        return run_sweep(args, argv)
    except RayLtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SweepInterrupted):
        print("ray-lt: interrupted before any trial started; nothing to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
