"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

Tune's ASHA compares trials on one metric, and Optuna's pruners refuse multi-objective studies,
so without this nothing stops a trial early when a sweep optimises two objectives (say overall
and few-shot accuracy). MO-ASHA (Schmucker et al. 2021) keeps ASHA's rungs and asynchrony and
replaces "is the metric above the rung's quantile" by a Pareto ranking of the objective vectors
recorded at the rung.

The rung rule, for a trial reaching a rung where ``n`` vectors (its own included) are recorded:

* a trial in the first non-dominated front of the rung always continues;
* otherwise it continues only if it is among the best ``floor(n / reduction_factor)`` of the
  rung, ranked by front (F1, F2, ...), then, inside the front that is cut, by crowding distance
  (larger first: it keeps the front's spread), then by arrival at the rung (earlier first);
* with fewer than ``reduction_factor`` vectors recorded that count is 0, so only non-dominated
  trials continue: the same cut as ASHA's, without a quantile of too few points.

Decisions use only the vectors recorded at that rung so far, so trials may report in any order.
A result that arrives after its trial was removed, errored or completed (a buffered report) is
ignored: the trial no longer runs, so it neither continues nor takes a place at a rung.
State is saved as JSON, never pickled: nothing here unpickles data read from a store.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from ray_lt.errors import ArtifactError, ConfigError
from ray_lt.pareto import non_dominated_sort, rung_decision
from ray_lt.searchers import has_metrics

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

MODES = ("max", "min")
STATE_FORMAT = "ray-lt.moasha"
STATE_VERSION = 1


def rung_milestones(grace_period: float, reduction_factor: float, max_t: float) -> list[float]:
    """``grace_period * reduction_factor**k`` for k = 0, 1, ... while it does not pass max_t."""
    milestones = []
    k = 0
    while (milestone := grace_period * reduction_factor**k) <= max_t * (1 + 1e-12):
        milestones.append(milestone)
        k += 1
    return milestones


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_metrics(metrics: Sequence[str], modes: Sequence[str]) -> tuple[list[str], list[str]]:
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(metrics) < 2:
        raise ConfigError(
            f"MultiObjectiveASHA needs at least 2 metrics, got {metrics}; "
            "use ASHA for one objective"
        )
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"MultiObjectiveASHA metrics {metrics} repeat a name; list each once")
    if len(modes) != len(metrics):
        raise ConfigError(
            f"MultiObjectiveASHA got {len(modes)} modes {modes} for {len(metrics)} metrics "
            f"{metrics}; give one mode per metric"
        )
    for metric, mode in zip(metrics, modes, strict=True):
        if mode not in MODES:
            raise ConfigError(
                f"MultiObjectiveASHA mode {mode!r} for metric {metric!r} is unknown; "
                "use 'max' or 'min'"
            )
    return metrics, modes


def _check_budget(max_t: float, grace_period: float, reduction_factor: float) -> None:
    if not _finite_number(reduction_factor) or reduction_factor <= 1:
        raise ConfigError(
            f"MultiObjectiveASHA reduction_factor {reduction_factor!r} must be a number > 1 "
            "(2 keeps the top half at each rung)"
        )
    if not _finite_number(max_t) or not _finite_number(grace_period):
        raise ConfigError(
            f"MultiObjectiveASHA max_t {max_t!r} and grace_period {grace_period!r} must be numbers"
        )
    if grace_period < 1 or grace_period > max_t:
        raise ConfigError(
            f"MultiObjectiveASHA grace_period {grace_period!r} must be between 1 and "
            f"max_t ({max_t!r})"
        )


class MultiObjectiveASHA(FIFOScheduler):
    """Asynchronous successive halving on two or more objectives (see the module docstring).

    Args:
        metrics: the objectives, as reported by the trainable (at least two).
        modes: "max" or "min", one per metric.
        time_attr: the monotonic progress key of a result (the sweep reports "epoch").
        max_t: the last time a rung may sit at; with ``stop_last_trials`` a trial reporting at
            or past it is stopped as its budget is spent.
        grace_period: the first rung; no trial is stopped before it.
        reduction_factor: rungs sit at ``grace_period * reduction_factor**k``; the top
            ``1 / reduction_factor`` of a rung (plus its whole first front) continues.
        stop_last_trials: stop every trial at ``max_t`` (off by default, as in the sweep, which
            never stops a trial at its last epoch).

    A result lacking any metric or ``time_attr`` (an epoch that did not evaluate), holding a
    non-finite value, or carrying ``ray_lt_error`` is ignored: CONTINUE, nothing recorded.
    ``stopped()`` says which trials it stopped and when (the sweep tags them in MLflow).
    """

    def __init__(
        self,
        metrics: Sequence[str],
        modes: Sequence[str],
        time_attr: str = "epoch",
        max_t: float = 100,
        grace_period: float = 1,
        reduction_factor: float = 2,
        stop_last_trials: bool = False,
    ):
        self._metrics, self._modes = _check_metrics(metrics, modes)
        _check_budget(max_t, grace_period, reduction_factor)
        if not isinstance(time_attr, str) or not time_attr:
            raise ConfigError(f"MultiObjectiveASHA time_attr {time_attr!r} must be a result key")
        super().__init__()
        # Tune reads ``scheduler.metric`` as one result key (``key in result``): a list there
        # would raise, and None tells it this scheduler checks no single metric.
        self._metric = None
        self._time_attr = time_attr
        self._max_t = max_t
        self._grace_period = grace_period
        self._reduction_factor = reduction_factor
        self._stop_last_trials = bool(stop_last_trials)
        self._milestones = rung_milestones(grace_period, reduction_factor, max_t)
        # One dict per rung: trial id -> objective vector, in arrival order.
        self._rungs: list[dict[str, tuple[float, ...]]] = [{} for _ in self._milestones]
        self._live: set[str] = set()
        self._gone: set[str] = set()  # removed, errored or completed: late results are ignored
        self._stopped: dict[str, float] = {}  # trial id -> the time it was stopped at
        self._num_stopped = 0

    @property
    def metrics(self) -> list[str]:
        return list(self._metrics)

    @property
    def modes(self) -> list[str]:
        return list(self._modes)

    @property
    def milestones(self) -> list[float]:
        return list(self._milestones)

    @property
    def num_stopped(self) -> int:
        return self._num_stopped

    def stopped(self) -> dict[str, float]:
        """The trials this scheduler stopped: trial id -> the ``time_attr`` value it stopped at."""
        return dict(self._stopped)

    def records(self) -> dict[float, dict[str, tuple[float, ...]]]:
        """A copy of what each rung recorded: milestone -> trial id -> objective vector."""
        return {m: dict(rung) for m, rung in zip(self._milestones, self._rungs, strict=True)}

    def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
        """Accept Tune's properties only when they agree with this scheduler's own.

        Tune passes metric=None and mode=None when ``TuneConfig`` names no metric, which is
        how a multi-objective sweep runs. A single metric (or a mode that differs from ours)
        would mean Tune expects one objective; returning False makes Tune refuse the setup.
        """
        metrics = [metric] if isinstance(metric, str) else metric
        if metrics is not None and list(metrics) != self._metrics:
            return False
        modes = [mode] * len(self._modes) if isinstance(mode, str) else mode
        return modes is None or list(modes) == self._modes

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._live.add(trial.trial_id)
        self._gone.discard(trial.trial_id)  # a trial Tune restarts (a retry) runs again

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._leave(trial.trial_id)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._leave(trial.trial_id)

    def _leave(self, trial_id: str) -> None:
        self._live.discard(trial_id)
        self._gone.add(trial_id)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        """Record the trial at the rung it just reached and decide there; CONTINUE otherwise."""
        point = self._point(result)
        if point is None or trial.trial_id in self._gone:
            return TrialScheduler.CONTINUE
        time = result[self._time_attr]
        keep = self._record(trial.trial_id, time, point)
        if keep and self._stop_last_trials and time >= self._max_t:
            keep = False  # budget spent, not pruned
        if not keep:
            self._num_stopped += 1
            self._stopped[trial.trial_id] = float(time)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(
        self, tune_controller: Any, trial: Trial, result: dict[str, Any]
    ) -> None:
        """A finished trial's last result still counts at its rung, as in ASHA."""
        point = self._point(result) if result else None
        if point is not None and trial.trial_id not in self._gone:
            self._record(trial.trial_id, result[self._time_attr], point)
        self._leave(trial.trial_id)

    def _point(self, result: dict[str, Any]) -> tuple[float, ...] | None:
        """The result's objective vector, or None when the result cannot be ranked."""
        if not has_metrics(result, self._metrics):
            return None
        if not _finite_number(result.get(self._time_attr)):
            return None
        return tuple(float(result[m]) for m in self._metrics)

    def _record(self, trial_id: str, time: float, point: tuple[float, ...]) -> bool:
        """Record ``point`` at the highest rung ``time`` reached and say whether the trial
        continues. A trial is ranked once per rung: a rung it (or a later rung) already holds
        it at, or a time before the first rung, records nothing and continues."""
        rung = bisect.bisect_right(self._milestones, time) - 1
        if rung < 0 or any(trial_id in r for r in self._rungs[rung:]):
            return True
        recorded = self._rungs[rung]
        keep = rung_decision(list(recorded.values()), point, self._modes, self._reduction_factor)
        recorded[trial_id] = point
        return keep

    def debug_string(self) -> str:
        objectives = ", ".join(
            f"{m} ({d})" for m, d in zip(self._metrics, self._modes, strict=True)
        )
        lines = [f"Using MultiObjectiveASHA on {objectives}: num_stopped={self._num_stopped}"]
        for milestone, rung in zip(self._milestones, self._rungs, strict=True):
            fronts = non_dominated_sort(list(rung.values()), self._modes)
            first = len(fronts[0]) if fronts else 0
            lines.append(
                f"Rung {self._time_attr}={milestone:g}: {len(rung)} recorded, "
                f"{first} non-dominated"
            )
        return "\n".join(lines)

    def _config(self) -> dict[str, Any]:
        return {
            "metrics": self._metrics,
            "modes": self._modes,
            "time_attr": self._time_attr,
            "milestones": self._milestones,
            "reduction_factor": self._reduction_factor,
        }

    def save(self, checkpoint_path: str) -> None:
        """Write the rung records as JSON (atomically: a temporary file, then a rename)."""
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self._config(),
            "num_stopped": self._num_stopped,
            "stopped": self._stopped,
            "rungs": [[[tid, list(p)] for tid, p in rung.items()] for rung in self._rungs],
        }
        tmp = f"{checkpoint_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, allow_nan=False)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        """Load rung records written by ``save`` for the same metrics, modes and rungs."""
        state = _read_state(checkpoint_path)
        if state.get("config") != json.loads(json.dumps(self._config())):
            raise ConfigError(
                f"MultiObjectiveASHA state {checkpoint_path} was saved for {state.get('config')}, "
                f"not {self._config()}; restore it into a scheduler built the same way"
            )
        self._rungs = _parse_rungs(
            state, len(self._milestones), len(self._metrics), checkpoint_path
        )
        self._num_stopped = state["num_stopped"]
        self._stopped = _parse_stopped(state, checkpoint_path)


def _read_state(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"cannot read MultiObjectiveASHA state {path}: {err}") from None
    ok = isinstance(state, dict) and state.get("format") == STATE_FORMAT
    if not ok or state.get("version") != STATE_VERSION:
        raise ArtifactError(
            f"{path} is not MultiObjectiveASHA state version {STATE_VERSION}; "
            "restore a file written by MultiObjectiveASHA.save"
        )
    return state


def _parse_rungs(state: dict[str, Any], n_rungs: int, n_metrics: int, path: str) -> list[dict]:
    """The rung records of a loaded state, checked entry by entry."""
    rungs, stopped = state.get("rungs"), state.get("num_stopped")
    malformed = ArtifactError(
        f"MultiObjectiveASHA state {path} has malformed rung records; "
        "restore a file written by MultiObjectiveASHA.save"
    )
    if not isinstance(rungs, list) or len(rungs) != n_rungs or not isinstance(stopped, int):
        raise malformed
    parsed = []
    for rung in rungs:
        if not isinstance(rung, list) or not all(_valid_record(e, n_metrics) for e in rung):
            raise malformed
        parsed.append({tid: tuple(float(v) for v in values) for tid, values in rung})
    return parsed


def _valid_record(entry: Any, n_metrics: int) -> bool:
    if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
        return False
    values = entry[1]
    return (
        isinstance(values, list)
        and len(values) == n_metrics
        and all(_finite_number(v) for v in values)
    )


def _parse_stopped(state: dict[str, Any], path: str) -> dict[str, float]:
    """The stopped trials of a loaded state (absent from files written before it was kept)."""
    stopped = state.get("stopped", {})
    ok = isinstance(stopped, dict) and all(
        isinstance(k, str) and _finite_number(v) for k, v in stopped.items()
    )
    if not ok:
        raise ArtifactError(
            f"MultiObjectiveASHA state {path} has a malformed 'stopped' record; "
            "restore a file written by MultiObjectiveASHA.save"
        )
    return {k: float(v) for k, v in stopped.items()}
