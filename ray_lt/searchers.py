"""How a trial's outcome reaches the searcher: a failed configuration is a failed trial.

A trial whose configuration fails (a diverged loss, a bad config) ends with a report that
carries ``ERROR_KEY`` and no metric. Optuna reads the metric from every intermediate result
and would stop the whole sweep with a ``KeyError``; with seed repetition a failed seed would
silently drop out of the mean. The two wrappers here tell Optuna such a configuration failed
(its trial state becomes FAIL) and let the sweep go on with the other trials.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search import ConcurrencyLimiter, Repeater

from ray_lt.errors import ERROR_KEY


def _metrics(searcher: Any) -> list[str]:
    metric = searcher.metric
    return list(metric) if isinstance(metric, (list, tuple)) else [metric]


def has_metrics(result: dict[str, Any] | None, metrics: list[str]) -> bool:
    """True when ``result`` holds a finite value of every metric and is not an error report."""
    if not result or ERROR_KEY in result:
        return False
    values = [result.get(m) for m in metrics]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


class FailureAwareLimiter(ConcurrencyLimiter):
    """A ``ConcurrencyLimiter`` that shows the searcher only results that carry the metric.

    Reports without it (an epoch that did not evaluate, a failed configuration) are not
    intermediate values; a trial that ends without it completes as an error.
    """

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if has_metrics(result, _metrics(self.searcher)):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if error or not has_metrics(result, _metrics(self.searcher)):
            super().on_trial_complete(trial_id, result=None, error=True)
        else:
            super().on_trial_complete(trial_id, result=result, error=False)


class SeedRepeater(Repeater):
    """Tune's ``Repeater`` (one suggestion, once per seed), except that a configuration with a
    failed seed is reported failed instead of averaged over the seeds that survived."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False, **_: Any
    ) -> None:
        group = self._trial_id_to_group.get(trial_id)
        if group is None:
            return
        metrics = _metrics(self.searcher)
        ok = not error and has_metrics(result, metrics)
        group.report(trial_id, [float(result[m]) for m in metrics] if ok else math.nan)
        if not group.finished_reporting():
            return
        scores = group.scores()
        if any(not isinstance(s, list) for s in scores):
            self.searcher.on_trial_complete(group.primary_trial_id, result=None, error=True)
            return
        means = {m: sum(s[i] for s in scores) / len(scores) for i, m in enumerate(metrics)}
        self.searcher.on_trial_complete(group.primary_trial_id, result=means)
