"""An experiment file is plain Python that builds one ``Experiment`` value.

The file is imported as a module (like a detectron2 lazy config), never ``exec``'d into our
globals. It names a pipeline (trial config -> final stage spec), a Tune search space, metric(s)
and mode(s), the search algorithm, the seeds every configuration runs with, the budget and a
smaller ``smoke`` variant for CPUs and CI, written as the fields that differ from the experiment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_lt.errors import ConfigError, ExperimentError
from ray_lt.spec import Resources, StageSpec

SEARCHES = ("optuna", "grid", "random")


def check_objectives(metric: Any, mode: Any) -> None:
    """One metric name, or a tuple of two or more distinct names for a Pareto search, each with
    a mode ("max" / "min": one per metric, or one for all).

    A one-name tuple is refused: it reads as a Pareto search but would run a single-objective
    one, and a typo'd second name is better caught here than after a sweep's first epoch.
    """
    if isinstance(metric, str):
        metrics: tuple[Any, ...] = (metric,)
    elif isinstance(metric, (tuple, list)):
        metrics = tuple(metric)
        if len(metrics) < 2:
            raise ConfigError(
                f"metric {metric!r} names {len(metrics)} objective(s); a Pareto search needs two "
                "or more, e.g. ('val_overall', 'val_few'); for one, write metric='val_overall'"
            )
    else:
        raise ConfigError(f"metric {metric!r} must be a name or a tuple of names")
    if any(not isinstance(m, str) or not m for m in metrics) or len(set(metrics)) < len(metrics):
        raise ConfigError(
            f"metric {metric!r} must hold distinct, non-empty names (reported keys such as "
            "'val_overall'); list each once"
        )
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if len(modes) not in (1, len(metrics)):
        raise ConfigError(
            f"mode {mode!r} gives {len(modes)} modes for the {len(metrics)} metrics of "
            f"{metric!r}; mode must be 'max' or 'min' for each metric (one per metric, or one "
            "for all)"
        )
    if any(m not in ("max", "min") for m in modes):
        raise ConfigError(f"mode {mode!r} must be 'max' or 'min' for each metric of {metric!r}")


@dataclass(frozen=True)
class Experiment:
    """What to run and how to search it.

    Args:
        name: the MLflow experiment and the Tune run name.
        pipeline: trial config (the sampled ``param_space`` plus ``seed``) -> final stage spec.
        param_space: Tune search space; constants are allowed beside ``tune.*`` domains.
        metric: what the search optimises (a reported key; validation metrics by default so
            the test split is never used for selection); a tuple of two or more for a Pareto
            search (docs/pareto.md).
        mode: "max" / "min" per metric, or one for all.
        search: "optuna" (TPE, the default), "grid" (every combination) or "random".
        seeds: every configuration runs once per seed; tables show mean +- std over them.
        num_samples: configurations to try (optuna, random); grid repeats the grid this often.
        max_concurrent_trials: trials running at once.
        scheduler: "asha" to stop poor trials early on the final stage's epochs (ASHA on one
            metric, MO-ASHA on a tuple), or None. Off when a configuration runs with several
            seeds under Optuna, and for a Pareto search with several seeds under any search:
            one seed is never stopped while the others of its configuration go on.
        grace_period: epochs of the final stage before ASHA may stop a trial.
        max_failures: retries of a trial whose process or node died (a lost spot instance);
            a failed configuration (a diverged loss, a bad config) is never retried.
        resources: per-worker resources of every stage unless a stage sets its own.
        store: artifact store root (local path or pyarrow.fs URI); --store overrides it.
        tracking_uri: MLflow tracking URI; --tracking-uri overrides it.
        data_root: dataset root; --data-root and $RAY_LT_DATA override it.
        smoke: a smaller variant for CPUs and CI, run with --smoke: a mapping of the fields
            that differ, e.g. ``dict(pipeline=smoke_pipeline, seeds=(0,))``; every other field
            is this experiment's. It is named ``<name>-smoke`` unless it sets another ``name``.
            (The old form, a whole ``Experiment``, is still accepted and used as it is.) The
            variant is built and checked when the experiment is, so ``exp.smoke`` is always
            an ``Experiment`` or None.
        report_metrics: the report's columns (test-split metrics of each trial's final stage),
            e.g. add ``soft_overall`` for a second head; ``--metrics`` overrides them.
        baseline: the report's reference row, by parameter values (e.g. ``{"method": "ce"}``):
            every other row is t-tested against it; ``--baseline`` overrides it.
    """

    name: str
    pipeline: Callable[[dict[str, Any]], StageSpec]
    param_space: Mapping[str, Any] = field(default_factory=dict)
    metric: str | tuple[str, ...] = "val_overall"
    mode: str | tuple[str, ...] = "max"
    search: str = "optuna"
    seeds: tuple[int, ...] = (0,)
    num_samples: int = 1
    max_concurrent_trials: int = 2
    scheduler: str | None = "asha"
    grace_period: int = 1
    max_failures: int = 2
    resources: Resources = field(default_factory=Resources)
    store: str = "ray_lt_store"
    tracking_uri: str | None = None
    data_root: str | None = None
    smoke: Mapping[str, Any] | Experiment | None = None
    report_metrics: tuple[str, ...] = ("many", "medium", "few", "overall")
    baseline: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ConfigError(f"unknown search '{self.search}'; known: {', '.join(SEARCHES)}")
        check_objectives(self.metric, self.mode)
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one, e.g. seeds=(0,)")
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ConfigError("num_samples and max_concurrent_trials must be >= 1")
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures!r} must be an int >= 0")
        if self.scheduler not in (None, "asha"):
            raise ConfigError(f"unknown scheduler '{self.scheduler}'; known: asha, None")
        if self.smoke is not None:
            object.__setattr__(self, "smoke", self._smoke_variant(self.smoke))

    def _smoke_variant(self, smoke: Mapping[str, Any] | Experiment) -> Experiment:
        """The smoke variant as an ``Experiment``: this one with the overrides, or the old form.

        Its name is ``<name>-smoke`` unless it sets another one (a name equal to this one's gets
        the suffix too, so a smoke run never shares the full run's MLflow experiment).
        """
        if isinstance(smoke, Experiment):
            if smoke.smoke is not None:
                raise ConfigError(
                    f"experiment '{self.name}': its smoke variant has a smoke variant itself; "
                    "remove it (a smoke variant is run as it is)"
                )
            variant = smoke
        elif isinstance(smoke, Mapping):
            names = [f.name for f in dataclasses.fields(Experiment) if f.name != "smoke"]
            for key in smoke:
                if key == "smoke":
                    raise ConfigError(
                        f"experiment '{self.name}': smoke overrides cannot set 'smoke'; "
                        "a smoke variant has no smoke variant of its own"
                    )
                if key not in names:
                    raise ConfigError(
                        f"experiment '{self.name}': unknown smoke override {key!r}; "
                        f"valid fields: {', '.join(names)}"
                    )
            try:
                variant = dataclasses.replace(self, **smoke, smoke=None)
            except ConfigError as err:
                raise ConfigError(f"experiment '{self.name}', smoke variant: {err}") from None
        else:
            raise ConfigError(
                f"experiment '{self.name}': smoke must be a dict of the fields that differ, "
                f"e.g. smoke=dict(seeds=(0,)), got {type(smoke).__name__}"
            )
        if variant.name == self.name:
            variant = dataclasses.replace(variant, name=f"{self.name}-smoke")
        return variant

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,) if isinstance(self.metric, str) else tuple(self.metric)

    @property
    def modes(self) -> tuple[str, ...]:
        modes = (self.mode,) if isinstance(self.mode, str) else tuple(self.mode)
        return modes * len(self.metrics) if len(modes) == 1 else modes

    def variant(self, smoke: bool) -> Experiment:
        """The smoke variant (named ``<name>-smoke`` unless it names itself) or this one."""
        if not smoke:
            return self
        if self.smoke is None:
            raise ExperimentError(
                f"experiment '{self.name}' has no smoke variant; add smoke=dict(...) with the "
                "fields that differ, e.g. smoke=dict(pipeline=smoke_pipeline, seeds=(0,))"
            )
        assert isinstance(self.smoke, Experiment)  # resolved in __post_init__
        return self.smoke


def project_root(path: str | Path) -> str:
    """The nearest folder above an experiment file that holds ``search_spaces/`` or a
    ``pyproject.toml`` (what the file's imports are relative to); else the file's grandparent."""
    path = Path(path).resolve()
    for folder in path.parents:
        if (folder / "search_spaces").is_dir() or (folder / "pyproject.toml").is_file():
            return str(folder)
    return str(path.parent.parent)


def load_experiment(path: str | Path, smoke: bool = False) -> Experiment:
    """Import an experiment file and return its ``experiment`` (or its smoke variant)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist; pass a path to a .py file")
    module_name = f"ray_lt_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ExperimentError(f"cannot import {path}; it must be a Python file")
    module = importlib.util.module_from_spec(spec)
    root = project_root(path)
    if root not in sys.path:
        sys.path.insert(0, root)  # experiments import search_spaces beside them
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ExperimentError(
            f"syntax error in {path} line {err.lineno}: {err.msg}; fix the file"
        ) from None
    except Exception as err:  # noqa: BLE001 - report any import-time failure in one line
        where = traceback.extract_tb(err.__traceback__)[-1]
        raise ExperimentError(
            f"importing {path} failed: {type(err).__name__}: {err} "
            f"(at {Path(where.filename).name}:{where.lineno}); fix the file"
        ) from None
    found = [v for v in vars(module).values() if isinstance(v, Experiment)]
    value = getattr(module, "experiment", None)
    if not isinstance(value, Experiment):
        if len(found) != 1:
            raise ExperimentError(
                f"{path} defines no `experiment = Experiment(...)` "
                f"(found {len(found)} Experiment values); define exactly one named `experiment`"
            )
        value = found[0]
    return value.variant(smoke)
