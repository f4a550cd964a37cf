"""Stage rows: the upstream stages of the reported configurations, with the same statistics.

A method's gain is only readable next to what it started from (cRT next to its CE features, a
student next to its teachers). Every stage a trial ran or reused is a nested MLflow run tagged
with its kind, name and content key (``tracking.Tracker.log_stage``); this module turns the
upstream ones (not ``ray_lt.final``) of the reported trial runs into ``ReportRow``s labelled by
the stage's name. A key is one result, so a stage shared by several trials counts once (its
seed is the seed of the trials that used it). Stages of one name whose params (but the seed) are
equal and whose trials overlap form one row; stages of one name fed by different upstream
stages are used by disjoint sets of configurations and so become separate rows.
It only reads the store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from ray_lt.errors import RayLtError
from ray_lt.report_model import ReportRow, make_row
from ray_lt.report_model import natural_key as _natural_key

KEY, KIND, NAME = "ray_lt.stage_key", "ray_lt.stage_kind", "ray_lt.stage_name"
PARENT, FINAL, REUSED = "mlflow.parentRunId", "ray_lt.final", "ray_lt.reused"
SEED_PARAM = "train/seed"
_FIX = (
    "re-run the sweep with this version (stored stages are reused, not retrained), "
    "or drop --stages"
)


@dataclass
class StageKey:
    """One stage result (one content key) and the reported trials that used it."""

    key: str
    name: str
    kind: str
    params: dict[str, str]
    runs: list = field(default_factory=list)  # its MLflow stage runs, oldest first
    configs: set[str] = field(default_factory=set)
    seeds: set[str] = field(default_factory=set)
    order: int = 1 << 30  # its first position in a trial's DAG walk (dependencies first)


def search_stage_runs(client, experiment_id: str) -> list:
    """Every stage run of the experiment (any parent), oldest first."""
    runs, token = [], None
    while token != "":
        page = client.search_runs(
            [experiment_id], "tags.`ray_lt.role` = 'stage'", page_token=token
        )
        runs.extend(page)
        token = page.token or ""
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def stage_rows(
    client, stage_runs: list, rows: list[ReportRow], metrics: list[str], experiment: str
) -> tuple[list[ReportRow], list[str]]:
    """The upstream stage rows of the configuration ``rows`` and the footnotes about them.

    Raises ``RayLtError`` when the reported trials have no stage run carrying the stage tags
    (a sweep older than them): there is nothing to show, and a silent empty block would read
    as "no upstream stage".
    """
    trial = {
        rid: (r.config_id, seed)
        for r in rows
        for rid, seed in zip(r.run_ids, r.seeds, strict=True)
    }
    mine = [s for s in stage_runs if s.data.tags.get(PARENT) in trial]
    tagged = [s for s in mine if KEY in s.data.tags and KIND in s.data.tags]
    if not tagged:
        cause = (
            f"the stage runs of the reported trials of '{experiment}' ({len(mine)}) predate "
            f"the stage tags ({KEY}, {KIND})"
            if mine
            else f"the reported trials of '{experiment}' have no stage runs (older runs)"
        )
        raise RayLtError(f"--stages: {cause}; {_FIX}")
    keys = _stage_keys(tagged, trial)
    notes = []
    if untagged := len(mine) - len(tagged):
        notes.append(f"Stage rows: ignored {untagged} stage runs without stage tags (older runs).")
    upstream = [k for k in keys.values() if not _is_final(k)]
    if not upstream:
        notes.append("Stage rows: the pipeline has no upstream stage (one stage per trial).")
        return [], notes
    groups = _group(upstream)
    labelled = sorted(
        zip(groups, _labels(groups, rows), strict=True),
        key=lambda gl: (min(k.order for k in gl[0]), _natural_key(gl[1])),
    )
    return [_row(client, g, label, metrics) for g, label in labelled], notes


def _is_final(key: StageKey) -> bool:
    return any(r.data.tags.get(FINAL) == "true" for r in key.runs)


def _stage_keys(tagged: list, trial: dict[str, tuple[str, str]]) -> dict[str, StageKey]:
    """Stage runs -> one ``StageKey`` per content key, with the trials' configs and seeds."""
    keys: dict[str, StageKey] = {}
    position: dict[str, int] = {}  # per parent run, how many stage runs came before
    for run in tagged:
        tags = run.data.tags
        parent = tags[PARENT]
        name = tags.get(NAME, "")
        name = tags[KIND] if name in ("", "None") else name
        params = {k: v for k, v in run.data.params.items() if k != SEED_PARAM}
        k = keys.setdefault(tags[KEY], StageKey(tags[KEY], name, tags[KIND], params))
        k.runs.append(run)
        k.configs.add(trial[parent][0])
        k.seeds.add(trial[parent][1])
        k.order = min(k.order, position.get(parent, 0))
        position[parent] = position.get(parent, 0) + 1
    return keys


def _group(keys: Iterable[StageKey]) -> list[list[StageKey]]:
    """Keys of one stage configuration: same name and params (but seed), overlapping trials."""
    by_spec: dict[tuple, list[StageKey]] = {}
    for k in keys:
        by_spec.setdefault((k.name, k.kind, tuple(sorted(k.params.items()))), []).append(k)
    groups: list[list[StageKey]] = []
    for same in by_spec.values():
        clusters: list[tuple[set[str], list[StageKey]]] = []
        for k in same:
            hits = [c for c in clusters if c[0] & k.configs]
            merged = (set(k.configs), [k])
            for c in hits:
                merged[0].update(c[0])
                merged[1].extend(c[1])
                clusters.remove(c)
            clusters.append(merged)
        groups.extend(c[1] for c in clusters)
    return groups


def _labels(groups: list[list[StageKey]], rows: list[ReportRow]) -> list[str]:
    """The stage name; where several rows share it, the params that differ, else the configs."""
    labels = []
    for g in groups:
        twins = [h for h in groups if h[0].name == g[0].name]
        if len(twins) == 1:
            labels.append(g[0].name)
            continue
        keys = sorted({p for h in twins for p in h[0].params})
        varying = [p for p in keys if len({h[0].params.get(p) for h in twins}) > 1]
        text = " ".join(f"{p.rsplit('/', 1)[-1]}={g[0].params.get(p, '')}" for p in varying)
        if not text:
            label_of = {r.config_id: r.label for r in rows}
            configs = sorted({label_of[c] for k in g for c in k.configs}, key=_natural_key)
            text = "for " + "; ".join(configs)
        labels.append(f"{g[0].name} ({text})")
    return labels


def _row(client, group: list[StageKey], label: str, metrics: list[str]) -> ReportRow:
    """One stage row: one value per key (the newest key of a seed wins), seeds as the trials'."""
    by_seed: dict[str, StageKey] = {}
    for k in sorted(group, key=lambda k: k.runs[-1].info.start_time or 0):
        by_seed["+".join(sorted(k.seeds, key=_natural_key))] = k
    seeds = sorted(by_seed, key=_natural_key)
    values = {m: [] for m in metrics}
    for seed in seeds:
        final = final_metrics(client, by_seed[seed].runs, metrics)
        for m in metrics:
            values[m].append(final.get(m, math.nan))
    first = group[0]
    run_ids = [by_seed[s].runs[-1].info.run_id for s in seeds]
    row = make_row(
        f"stage:{first.name}:{first.key[:12]}", label, first.params, seeds, values, run_ids
    )
    row.stage = first.kind
    return row


def final_metrics(client, runs: list, metrics: list[str]) -> dict[str, float]:
    """The stage's final (test and ``val_*``) metrics: the values logged at step 0.

    A stage run that trained also holds the per-epoch history under the same names at steps
    1, 2, ..., and MLflow's "latest" value is the one of the highest step: the last epoch's,
    not the exported model's (they differ when a stage keeps its best epoch). A run that reused
    the stage holds only the step-0 values, so it is read when there is one.
    """
    reused = [r for r in runs if r.data.tags.get(REUSED) == "true"]
    if reused:
        return {m: float(v) for m, v in reused[-1].data.metrics.items() if m in metrics}
    run = runs[-1]
    out = {}
    for m in metrics:
        if m in run.data.metrics:
            at_zero = [h for h in client.get_metric_history(run.info.run_id, m) if h.step == 0]
            if at_zero:
                out[m] = float(max(at_zero, key=lambda h: h.timestamp).value)
    return out


def learning_curves(
    client, stage_runs: list, rows: list[ReportRow]
) -> tuple[str, dict[str, dict[int, list[float]]]]:
    """Per configuration row, the final stage's per-epoch metric: ``{epoch: [value per seed]}``.

    Trial runs hold only final metrics; the per-epoch history is on the nested run of the
    stage that trained (``ray_lt.reused=false``), which may sit under another trial when this
    trial reused it. The metric is ``val_overall``, or ``overall`` (test) where no run logged a
    validation split. Only evaluated epochs count (every ``train/eval_every`` and the last):
    between evaluations the engine repeats the latest numbers.
    """
    trained: dict[str, object] = {}
    final: dict[str, str] = {}  # trial run id -> its final stage's key
    for s in stage_runs:
        tags = s.data.tags
        if KEY not in tags:
            continue
        if tags.get(REUSED) != "true":
            trained[tags[KEY]] = s  # the newest one wins
        if tags.get(FINAL) == "true":
            final[tags.get(PARENT, "")] = tags[KEY]
    sources = {rid: trained.get(final.get(rid, "")) for r in rows for rid in r.run_ids}
    has_val = any(s is not None and "val_overall" in s.data.metrics for s in sources.values())
    metric = "val_overall" if has_val else "overall"
    curves: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        for rid in row.run_ids:
            if (source := sources[rid]) is None or metric not in source.data.metrics:
                continue
            for epoch, value in _history(client, source, metric).items():
                curves.setdefault(row.config_id, {}).setdefault(epoch, []).append(value)
    return metric, curves


def _history(client, run, metric: str) -> dict[int, float]:
    """Epoch -> value of ``metric`` over the evaluated epochs of a stage run (steps >= 1)."""
    steps = {h.step: h.value for h in client.get_metric_history(run.info.run_id, metric)}
    steps = {e: v for e, v in steps.items() if e >= 1 and math.isfinite(v)}
    every = max(1, int(float(run.data.params.get("train/eval_every", "1"))))
    last = max(steps, default=0)
    return {e: float(v) for e, v in sorted(steps.items()) if e % every == 0 or e == last}
