"""``--dry-run``: what a sweep would run and train, without training and without starting Ray.

A sweep's cost is decided by how many distinct stages it must train: trials that share a stage
(a seed's CE features, a teacher) train it once, and a stage the store already holds is reused.
This module expands the trials the way the sweep does (the search space's grid times the seeds,
``num_samples`` times) and prints each trial's stage DAG beside what the store holds, so a user
sees that count before spending hours. It must never write to the store, start Ray or touch
MLflow.

Grid sweeps (and random sweeps without sampled domains) are expanded exactly. Where the sweep
samples (Optuna, random domains) only its first batch, ``max_concurrent_trials`` trials, is
known before any result comes back; that batch is drawn from the search space and labelled so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray_lt.console import short_config
from ray_lt.experiment import Experiment
from ray_lt.preflight import call_pipeline
from ray_lt.spec import StageSpec, walk

KEY_CHARS = 8  # hex digits of a key shown: enough to tell stages of one sweep apart


@dataclass(frozen=True)
class PlannedTrial:
    """One trial the sweep would start: its configuration, seed and final stage."""

    config: dict[str, Any]  # the sampled search space, without the seed
    seed: int
    final: StageSpec


@dataclass(frozen=True)
class Plan:
    """The trials shown, and how they relate to the whole sweep."""

    trials: list[PlannedTrial]
    total: int  # trials the whole sweep runs
    exact: bool  # the trials shown are the sweep's trials, not a first sampled batch


def plan_sweep(exp: Experiment) -> Plan:
    """The sweep's trials (every one for a grid, the first batch where the sweep samples)."""
    from ray.tune.search.sample import Domain

    sampled = _has(dict(exp.param_space), Domain)
    variants = _variants(dict(exp.param_space))
    total = exp.num_samples * len(variants) * len(exp.seeds)
    if exp.search in ("grid", "random") and not sampled:
        configs = [dict(v) for _ in range(exp.num_samples) for v in variants]
        trials = [_trial(exp, c, s) for c in configs for s in exp.seeds]
        return Plan(trials, total, exact=True)
    if exp.search == "optuna":  # one suggestion, repeated once per seed
        total = exp.num_samples * len(exp.seeds)
    draws = [_variants(dict(exp.param_space), random_state=i) for i in range(exp.num_samples)]
    configs = [dict(v) for draw in draws for v in draw]
    pairs = [(c, s) for c in configs for s in exp.seeds][: min(exp.max_concurrent_trials, total)]
    return Plan([_trial(exp, c, s) for c, s in pairs], total, exact=False)


def _variants(space: dict[str, Any], random_state: int = 0) -> list[dict[str, Any]]:
    """Tune's expansion of ``space``: one config per grid combination, domains sampled."""
    from ray.tune.search.variant_generator import generate_variants

    if not space:
        return [{}]
    return [spec for _, spec in generate_variants(space, random_state=random_state)]


def _has(value: Any, kind: type) -> bool:
    """True when a (nested) search space holds a ``kind`` value outside ``grid_search``."""
    if isinstance(value, kind):
        return True
    if isinstance(value, dict) and set(value) != {"grid_search"}:
        return any(_has(v, kind) for v in value.values())
    return False


def _trial(exp: Experiment, config: dict[str, Any], seed: int) -> PlannedTrial:
    final = call_pipeline(exp, {**config, "seed": seed})
    return PlannedTrial(config, seed, final)


def render_plan(
    exp: Experiment, plan: Plan, store_uri: str, held: Callable[[str], bool]
) -> list[str]:
    """The plan as text: a header, each trial's DAG with what happens to each stage, totals.

    Args:
        held: whether the store holds a key (a complete artifact; ``ArtifactStore.contains``).
    """
    stored: dict[str, bool] = {}
    first_user: dict[str, int] = {}
    lines = [_header(exp, plan, store_uri)]
    for n, trial in enumerate(plan.trials, 1):
        config = short_config(trial.config)
        lines.append(f"trial {n}/{len(plan.trials)}  seed={trial.seed}  {config}")
        for depth, role, spec in _tree(trial.final):
            key = spec.key
            if key not in stored:
                stored[key] = held(key)
            first_user.setdefault(key, n)
            fate = _fate(stored[key], first_user[key], n)
            label = f"{role}: {spec.name}" if role else spec.name
            indent = "  " * (depth + 1)
            lines.append(f"{indent}{label:<{36 - 2 * depth}} {short_key(key)}  {fate}")
    lines += _totals(plan, stored)
    return lines


def _header(exp: Experiment, plan: Plan, store_uri: str) -> str:
    shown = "every trial" if plan.exact else f"the first batch of {len(plan.trials)}"
    return (
        f"dry run of '{exp.name}' ({exp.search} search, seeds {list(exp.seeds)}): "
        f"{plan.total} trials, showing {shown}; store {store_uri}"
    )


def _fate(in_store: bool, first: int, n: int) -> str:
    if in_store:
        return "reused (in the store)"
    return "train" if first == n else f"reused (trained by trial {first})"


def _tree(final: StageSpec) -> list[tuple[int, str, StageSpec]]:
    """(depth, role, spec) for the DAG below ``final``, the final stage first; a role is the
    input name a stage has in the stage that consumes it."""
    rows: list[tuple[int, str, StageSpec]] = []

    def visit(spec: StageSpec, depth: int, role: str) -> None:
        rows.append((depth, role, spec))
        for name, child in spec.inputs:
            visit(child, depth + 1, name)

    visit(final, 0, "")
    return rows


def _totals(plan: Plan, stored: dict[str, bool]) -> list[str]:
    """Unique stages across the trials shown: how many the store holds, how many train."""
    kinds: dict[str, str] = {}
    for trial in plan.trials:
        for spec in walk(trial.final):
            if not stored[spec.key]:
                kinds[spec.key] = spec.kind
    to_train = Counter(kinds.values())
    scope = "the sweep" if plan.exact else "this first batch"
    later = "" if plan.exact else "; later trials depend on the results of earlier ones"
    by_kind = ", ".join(f"{kind} {count}" for kind, count in sorted(to_train.items()))
    return [
        f"unique stages in {scope}: {len(stored)}: {len(stored) - len(kinds)} in the store "
        f"(reused), {len(kinds)} to train{later}",
        f"to train by kind: {by_kind or 'none'}",
    ]


def short_key(key: str) -> str:
    """``ce-0bcb613b806b9460`` -> ``ce-0bcb613b``: the kind and the first hex digits."""
    kind, _, digest = key.rpartition("-")
    return f"{kind}-{digest[:KEY_CHARS]}"
