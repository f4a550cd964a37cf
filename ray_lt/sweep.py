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
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from ray_lt.artifacts import ArtifactStore
from ray_lt.console import QuietConsole, log_path, route_worker_output
from ray_lt.errors import RayLtError
from ray_lt.experiment import Experiment, load_experiment, project_root
from ray_lt.interrupts import (
    EXIT_INTERRUPTED,
    Interrupts,
    SweepInterrupted,
    after_interrupt,
    quiet_tune_interrupt_lines,
)
from ray_lt.mirror import begin_sweep_run, end_sweep_run
from ray_lt.preflight import check_pipeline, check_resources, check_space
from ray_lt.spec import StageSpec, walk
from ray_lt.summary import summarize
from ray_lt.tracking import Tracker
from ray_lt.tracking_server import free_port
from ray_lt.tracking_store import default_tracking_uri, normalize_uri
from ray_lt.trial import SweepSetup, apply_resources, trial_cpus
from ray_lt.tuning import (
    build_tuner,
    check_inline_gpus,
    gpu_fraction,
    worker_count,
    worker_resources,
)

# MLflow's HTTP client retries for minutes by default; a sweep should notice a lost server fast
# and keep going (the mirror keeps what it could not write). Users may set their own values.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


@dataclass(frozen=True)
class SweepArgs:
    """The command line, typed."""

    file: str
    smoke: bool = False
    resume: bool = False
    tracking_uri: str | None = None
    store: str | None = None
    address: str | None = None
    data_root: str | None = None
    num_cpus: int | None = None
    gpus_per_worker: str = "auto"
    cpus_per_worker: float | None = None
    num_workers: int | None = None
    dry_run: bool = False
    verbose: bool = False


@dataclass
class Sweep:
    """What the driver resolved before Ray starts: every later step reads it."""

    args: SweepArgs
    exp: Experiment
    stages: list[StageSpec]  # one sample trial's DAG, dependencies first
    store: ArtifactStore
    tracking_uri: str
    data_root: str | None
    gpus: float | None  # --gpus-per-worker, None for auto
    run_id: str | None = None  # this invocation's MLflow sweep run (mirror.begin_sweep_run)


def parse_args(argv: list[str] | None) -> SweepArgs:
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
    p.add_argument(
        "--num-workers",
        type=worker_count,
        help="workers per stage (DDP when > 1); 0 trains every stage inline, in its trial's "
        "process on the CPU, without a Ray Train worker group (a quick check of a pipeline)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print every trial's stages and which of them the store already holds; "
        "train nothing and start no Ray",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output (worker logs, Tune's tables) on the console as well",
    )
    return SweepArgs(**vars(p.parse_args(argv)))


def _checked(args: SweepArgs) -> tuple[Experiment, list[StageSpec], str | None]:
    """The experiment, one sample trial's DAG and the data root, every name checked."""
    exp = load_experiment(args.file, smoke=args.smoke)
    check_space(exp)
    data_root = args.data_root or exp.data_root or os.environ.get("RAY_LT_DATA")
    data_root = os.path.abspath(data_root) if data_root else None
    return exp, check_pipeline(exp, data_root), data_root


def prepare(args: SweepArgs) -> Sweep:
    """Everything checked before Ray starts: each failure is one line and exit 2."""
    gpus = None if args.gpus_per_worker == "auto" else gpu_fraction(args.gpus_per_worker)
    check_inline_gpus(args.num_workers, gpus)
    exp, stages, data_root = _checked(args)
    store = ArtifactStore(_abs(args.store or exp.store))
    tracking_uri = normalize_uri(args.tracking_uri or exp.tracking_uri or default_tracking_uri())
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    Tracker(tracking_uri, exp.name)  # fails here, in one line, when the store is unreachable
    return Sweep(args, exp, stages, store, tracking_uri, data_root, gpus)


def dry_run(args: SweepArgs) -> int:
    """Print the plan (``plan.py``): the same checks as a sweep, then no Ray and no training.

    A local store that does not exist yet is not created (it holds nothing)."""
    from ray_lt.plan import plan_sweep, render_plan

    exp, _, _ = _checked(args)
    uri = _abs(args.store or exp.store)
    held = ArtifactStore(uri).contains if "://" in uri or os.path.isdir(uri) else _nothing
    for line in render_plan(exp, plan_sweep(exp), uri, held):
        print(line)
    return 0


def _nothing(key: str) -> bool:
    return False


def run_sweep(args: SweepArgs, argv: list[str]) -> int:
    if args.dry_run:
        return dry_run(args)
    if not args.verbose:  # MLflow's table-creation lines; a user's own setting wins
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    sweep = prepare(args)
    if args.resume:
        _replay(sweep)
    interrupts = Interrupts()
    console = None if args.verbose else QuietConsole(log_path(sweep.store.uri, sweep.exp.name))
    if console is not None:
        console.view = _live_view(sweep.exp)
    try:
        with interrupts.installed():
            results = _run_tune(sweep, interrupts, console)
    except SweepInterrupted:
        results = None
    except BaseException:
        end_sweep_run(sweep.tracking_uri, sweep.exp.name, sweep.run_id, "FAILED")
        raise
    finally:
        if console is not None:
            console.close()
    if interrupts.received:
        code = after_interrupt(sweep.exp.name, sweep.store, sweep.tracking_uri, interrupts, argv)
        end_sweep_run(sweep.tracking_uri, sweep.exp.name, sweep.run_id, "KILLED")
        return code
    _replay(sweep)
    code = summarize(sweep.exp, results, sweep.tracking_uri)
    status = "FINISHED" if code == 0 else "FAILED"  # 1: every trial failed
    end_sweep_run(sweep.tracking_uri, sweep.exp.name, sweep.run_id, status)
    return code


def _run_tune(sweep: Sweep, interrupts: Interrupts, console: QuietConsole | None) -> Any:
    """Start (or join) Ray, check resources, run the Tuner; Ray is shut down on the way out.

    With a ``console`` (the default, not ``--verbose``) Ray's output goes to its log file."""
    import ray

    started = not ray.is_initialized()
    if console is not None:
        console.open()
    if started:
        _init_ray(sweep)
        interrupts.reinstall()
    if console is not None:
        console.route_workers()
    else:
        route_worker_output(None)  # Ray's printing, less its false alarms
    try:
        tuner = _tuner(sweep)
        quiet_tune_interrupt_lines()
        prints = console.tune_prints() if console is not None else contextlib.nullcontext()
        view = console.view if console is not None else None
        with interrupts.tune_running(), prints, _shown(view):
            return tuner.fit()
    finally:
        if started:
            ray.shutdown()


def _live_view(exp: Experiment) -> Any:
    """The terminal's live view of the sweep (``live_view.py``); None on a pipe or a file."""
    from ray_lt.live_view import LiveView, wanted
    from ray_lt.plan import plan_sweep

    if not wanted(sys.stdout):
        return None
    try:
        total: int | None = plan_sweep(exp).total
    except Exception:  # noqa: BLE001 - the heading then counts the trials Tune has made
        total = None
    return LiveView(exp.name, total)


@contextlib.contextmanager
def _shown(view: Any) -> Any:
    """Show ``view`` while Tune runs; it stays on the terminal, drawn one last time."""
    if view is None:
        yield
        return
    view.start()
    try:
        yield
    finally:
        view.stop()


def _init_ray(sweep: Sweep) -> None:
    """An in-process Ray, or a connection to the cluster at ``--address``."""
    import ray
    import ray.cloudpickle

    args = sweep.args
    module = sys.modules.get(sweep.exp.pipeline.__module__)
    if module is not None and module.__name__.startswith("ray_lt_experiment_"):
        ray.cloudpickle.register_pickle_by_value(module)  # the file is not importable remotely
    init_kwargs = _ray_init_kwargs(args.address)
    env = _worker_env(args.file, sweep.tracking_uri, sweep.data_root)
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


def _tuner(sweep: Sweep) -> Any:
    """Resources checked against the cluster, datasets in the object store, then the Tuner
    (new, or restored for ``--resume``)."""
    import ray
    from ray import tune

    from ray_lt.data import load_dataset

    exp, args = sweep.exp, sweep.args
    resources = worker_resources(
        exp, sweep.gpus, args.cpus_per_worker, ray.cluster_resources(), workers=args.num_workers
    )
    sample = walk(apply_resources(sweep.stages[-1], exp, resources))
    check_resources(sample, trial_cpus(sample))
    refs = {s.data: ray.put(load_dataset(s.data, sweep.data_root)) for s in sweep.stages}
    # the sweep's MLflow run, made once the sweep can start (a --resume continues its own)
    sweep.run_id = begin_sweep_run(
        sweep.store, sweep.tracking_uri, exp, args.file, args.smoke, args.resume
    )
    setup = SweepSetup(
        exp,
        sweep.store.uri,
        sweep.tracking_uri,
        sweep.data_root,
        refs,
        args.smoke,
        resources,
        sweep.run_id,
    )
    trainable, space, tune_config, run_config = build_tuner(
        exp, setup, sweep.store, sweep.stages[-1].train.epochs, trial_cpus(sample)
    )
    if not args.verbose:
        run_config.verbose = 0  # no status tables: the trials print a line per stage
    path = f"{run_config.storage_path}/{exp.name}"
    if not args.resume:
        return tune.Tuner(
            trainable, param_space=space, tune_config=tune_config, run_config=run_config
        )
    if not tune.Tuner.can_restore(path):
        raise RayLtError(f"nothing to resume at {path}; run without --resume to start the sweep")
    return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)


HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


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
    # Ray Train's controller looks at its workers every 2 s by default, so a finished worker
    # group is noticed (and torn down) up to 2 s late, on every fit; 0.5 s costs nothing.
    env[HEALTH_CHECK_ENV] = os.environ.get(HEALTH_CHECK_ENV, "0.5")
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


def _replay(sweep: Sweep) -> None:
    """Mirror to MLflow what trials kept in the store while the server was unreachable."""
    from ray_lt.mirror import replay_outbox

    try:
        done, left = replay_outbox(sweep.store, sweep.tracking_uri, sweep.exp.name)
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


def _abs(path_or_uri: str) -> str:
    return path_or_uri if "://" in path_or_uri else os.path.abspath(path_or_uri)


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
