"""One Tune trial: one configuration with one seed, its whole stage pipeline.

The sweep driver hands every trial the same ``SweepSetup`` (through the object store); the trial
builds its stage DAG from its config, runs it with ``pipeline.run_pipeline`` (each stage reused
from the store or trained), mirrors it to MLflow and reports the final stage's metrics to Tune.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray_lt.artifacts import Artifact, ArtifactStore
from ray_lt.console import StageProgress, trial_label
from ray_lt.errors import ERROR_KEY, RayLtError
from ray_lt.experiment import Experiment
from ray_lt.preflight import call_pipeline
from ray_lt.spec import Resources, StageSpec, walk, with_resources

TRIAL_INDEX = "__trial_index__"  # Tune's repeat index, set when Optuna repeats per seed


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
    sweep_run_id: str | None = None  # the MLflow run of the sweep (trial runs nest under it)


def seeded(config: dict[str, Any], seeds: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """A trial's configuration as its pipeline sees it: Tune's repeat index turned into the
    seed it stands for (Optuna's sweeps repeat each suggestion once per seed)."""
    config = dict(config)
    index = config.pop(TRIAL_INDEX, None)
    config.setdefault("seed", seeds[int(index or 0) % len(seeds)])
    return config


def seeded_label(config: dict[str, Any], seeds: tuple[int, ...] | list[int]) -> str:
    """The label a trial's console lines carry, from Tune's side of the trial."""
    return trial_label(seeded(config, seeds))


def run_trial(config: dict[str, Any], setup: SweepSetup) -> None:
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
    config = seeded(config, exp.seeds)
    store = ArtifactStore(setup.store_uri)
    trial_id = tune.get_context().get_trial_id()
    mirror = TrialMirror(
        setup.tracking_uri, exp.name, store, trial_id, config, setup.smoke, setup.sweep_run_id
    )
    try:
        final = apply_resources(call_pipeline(exp, config), exp, setup.resources)
        done = store.lookup(final.key) if mirror.finished_before else None
        if done is not None:  # finished and tracked before the driver died: report, run nothing
            tune.report({**_result(done), "artifact": done.key, "seed": config["seed"]})
            return
        # one console line as each stage starts and ends (see ray_lt.console)
        watch = StageProgress(mirror, trial_label(config), walk(final), exp.metrics[0])
        ctx = TrialContext(
            store_uri=setup.store_uri,
            data_refs=dict(setup.data_refs),
            data_root=setup.data_root,
            mirror=watch,
            report_to_tune=True,
            stage_seconds=mirror.stage_seconds,  # the mirror logs each stage's real duration
        )
        watch.begin()
        artifact = run_pipeline(final, ctx)[-1].artifact
        result = _result(artifact)
        mirror.finish(result, artifact.key)
    except RayLtError as err:
        mirror.fail(err)
        tune.report({ERROR_KEY: " ".join(str(err).split())[:500], "seed": config["seed"]})
        return
    except SystemExit as err:
        # Tune ends a trial its scheduler stopped with SystemExit(0): not a failure; the run
        # stays open and the summary marks it KILLED (``Tracker.close_unfinished``).
        if err.code not in (0, None):
            mirror.fail(err)
        raise
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
