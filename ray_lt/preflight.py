"""Checks the sweep makes before any trial starts, so bad input costs seconds, not a sweep.

Each raises a one-line ``RayLtError`` naming the cause and the fix: an impossible search space,
a pipeline that fails or names unknown stages, datasets, models or config keys, and stages that
ask for more than any node of the cluster can ever offer (which Ray would otherwise wait for
forever).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray_lt.errors import ConfigError, RayLtError
from ray_lt.experiment import Experiment
from ray_lt.spec import StageSpec, walk


def sample_config(space: Any) -> Any:
    """One concrete config from a Tune search space (first grid value, a sample per domain)."""
    from ray.tune.search.sample import Domain

    if isinstance(space, Domain):
        return space.sample()
    if isinstance(space, dict):
        if set(space) == {"grid_search"}:
            return sample_config(space["grid_search"][0])
        return {k: sample_config(v) for k, v in space.items()}
    return space


def check_space(exp: Experiment) -> None:
    """Reject empty or impossible search spaces before any trial starts."""
    from ray.tune.search.sample import Categorical, Float, Integer

    domains = 0

    def visit(name: str, value: Any) -> None:
        nonlocal domains
        if isinstance(value, dict) and set(value) == {"grid_search"}:
            if not value["grid_search"]:
                raise ConfigError(f"impossible search space: '{name}' is an empty grid_search")
            if exp.search == "optuna":
                raise ConfigError(
                    f"'{name}' is a grid_search, which Optuna cannot search; "
                    "use search='grid' or a tune.choice"
                )
            domains += 1
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{name}/{k}" if name else k, v)
        elif isinstance(value, (Float, Integer)):
            lo, hi = value.lower, value.upper
            sampler = type(value.get_sampler()).__name__.lower()
            if not lo < hi or ("log" in sampler and lo <= 0):
                raise ConfigError(
                    f"impossible search space: '{name}' has lower={lo}, upper={hi}; "
                    "it needs lower < upper (and lower > 0 for a log scale)"
                )
            domains += 1
        elif isinstance(value, Categorical):
            if not value.categories:
                raise ConfigError(f"impossible search space: '{name}' is an empty tune.choice")
            domains += 1

    visit("", dict(exp.param_space))
    if exp.search == "optuna" and domains == 0:
        raise ConfigError(
            f"empty search space in experiment '{exp.name}': param_space has no tune.* domain "
            "for Optuna; add one (e.g. 'lr': tune.loguniform(1e-3, 0.3)) or use search='grid'"
        )
    if "seed" in exp.param_space:
        raise ConfigError("put seeds in Experiment(seeds=...), not in param_space['seed']")


def check_pipeline(exp: Experiment, data_root: str | None) -> list[StageSpec]:
    """Build one sample trial's DAG and check every name in it; load each dataset once and
    validate every stage on its per-class training counts (``Objective.validate``)."""
    from ray_lt.data import DATASETS, load_dataset
    from ray_lt.models import BACKBONES, HEADS
    from ray_lt.objective import make_objective

    config = {**sample_config(dict(exp.param_space)), "seed": exp.seeds[0]}
    final = call_pipeline(exp, config)
    if not isinstance(final, StageSpec):
        raise ConfigError(
            f"the pipeline of '{exp.name}' returned {type(final).__name__}, not a StageSpec"
        )
    stages = walk(final)
    for spec in stages:
        objective = make_objective(spec)  # unknown kinds and params fail here
        DATASETS.get(spec.data.name)
        architecture = objective.architecture()
        for name, registry in (("backbone", BACKBONES), ("head", HEADS)):
            if name in architecture:
                registry.get(architecture[name])
        data = load_dataset(spec.data, data_root)
        objective.validate(data.class_counts)  # on the real training counts
    return stages


def call_pipeline(exp: Experiment, config: dict[str, Any]) -> Any:
    """``exp.pipeline(config)``; a failure of the user's function becomes one line, and a key
    the search space does not define is named beside the ones it does."""
    try:
        return exp.pipeline(config)
    except RayLtError:
        raise
    except KeyError as err:
        key = err.args[0] if err.args else None
        if isinstance(key, str) and key not in config:
            defined = ", ".join(sorted(k for k in config if not k.startswith("__")))
            raise ConfigError(
                f"the pipeline of '{exp.name}' reads config[{key!r}], which its search space "
                f"does not define (defined: {defined}); add {key!r} to param_space or give it a "
                "default in the pipeline"
            ) from None
        raise _pipeline_error(exp, config, err) from None
    except Exception as err:  # noqa: BLE001 - the user's pipeline function failed
        raise _pipeline_error(exp, config, err) from None


def _pipeline_error(exp: Experiment, config: Mapping[str, Any], err: Exception) -> ConfigError:
    shown = {k: v for k, v in config.items() if not k.startswith("__")}
    return ConfigError(
        f"the pipeline of '{exp.name}' failed on config {shown}: {type(err).__name__}: {err}"
    )


def check_resources(stages: list[StageSpec], trial_cpus: float) -> None:
    """Fail when a stage's worker, or a trial itself, fits no node this cluster has or (with an
    autoscaler) can ever add; Ray would keep such a request pending forever."""
    offers = _node_offers()
    described = _describe_offers(offers)
    asks = [("every trial", 0, {"CPU": trial_cpus})]
    for spec in stages:
        res = spec.resources
        if res.inline:
            continue
        worker = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
        asks.append((f"stage '{spec.name}'", res.num_workers, worker))
    for who, workers, need in asks:
        wanted = {k: v for k, v in need.items() if v > 0}
        if not any(_fits(wanted, offer) for _, offer in offers):
            raise ConfigError(
                f"{who} asks for {_describe_ask(workers, wanted)}, but no node of this cluster "
                f"can ever offer that ({described}); lower --cpus-per-worker / --gpus-per-worker "
                "(or --num-cpus for an in-process Ray), or add a node that has it"
            )


def _node_offers() -> list[tuple[str, dict[str, float]]]:
    """(label, resources) of every live node, and of every node type an autoscaler may add."""
    import ray

    offers = [("node", dict(n.get("Resources", {}))) for n in ray.nodes() if n.get("Alive")]
    for name, resources, _ in autoscaler_node_types():
        offers.append((f"node type {name!r}", resources))
    return offers


#: Where ``ray up`` leaves the cluster's config on the head; the head's autoscaler reads it.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def autoscaler_node_types(
    path: str = BOOTSTRAP_CONFIG,
) -> list[tuple[str, dict[str, float], int]]:
    """(name, resources, most nodes) of each node type the connected cluster's autoscaler may
    add, so that a cluster that starts with no GPU worker is not taken for a cluster without
    GPUs. Ray's GCS holds these for some autoscalers; the cluster launcher's (``ray up``) keeps
    them only in the config file on the head, which is read when this process is connected to
    the cluster a ``ray start`` on this machine started. Empty when neither is there.
    """
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config in this Ray: none
        config = None
    groups = getattr(config, "node_group_configs", None) or []
    if groups:
        return [(g.name, dict(g.resources), g.max_count) for g in groups if g.max_count != 0]
    if not _joined_this_machines_cluster():
        return []
    return node_types_in_launcher_config(os.path.expanduser(path))


def _joined_this_machines_cluster() -> bool:
    """Whether this process's Ray is the cluster ``ray start`` on this machine started (a
    sweep's in-process Ray on a head node must not borrow the head's node types)."""
    import ray
    from ray._common.utils import get_ray_address_file

    try:
        node = ray._private.worker.global_worker.node
        started = Path(get_ray_address_file(node.get_temp_dir_path())).read_text().strip()
        return ray.get_runtime_context().gcs_address == started
    except (OSError, AttributeError):
        return False


def node_types_in_launcher_config(path: str) -> list[tuple[str, dict[str, float], int]]:
    """The worker node types of a cluster-launcher config (``available_node_types`` less the
    head's type), each with its numeric resources and ``max_workers``; a missing or unreadable
    file gives none."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return []
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    found = []
    for name, node_type in types.items():
        if name == head or not isinstance(node_type, dict):
            continue
        most = int(node_type.get("max_workers", config.get("max_workers", 0)))
        resources = {
            k: float(v)
            for k, v in (node_type.get("resources") or {}).items()
            if isinstance(v, (int, float))
        }
        if most != 0:
            found.append((name, resources, most))
    return found


def _fits(need: Mapping[str, float], offer: Mapping[str, float]) -> bool:
    return all(offer.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _describe_ask(workers: int, need: Mapping[str, float]) -> str:
    """What a trial (``workers == 0``: its own process) or a stage's workers ask for."""
    each = ", ".join(f"{v:g} {k}" for k, v in need.items()) or "nothing"
    if workers == 0:
        return each
    return f"{each} per worker ({workers} worker{'s' if workers != 1 else ''})"


def _describe_offers(offers: list[tuple[str, dict[str, float]]]) -> str:
    if not offers:
        return "it has no live node"
    parts = []
    for label, res in offers:
        cpu, gpu = res.get("CPU", 0.0), res.get("GPU", 0.0)
        parts.append(f"{label} with {cpu:g} CPU, {gpu:g} GPU")
    return "; ".join(parts)
