"""The sweep's closing summary: one line per trial, and the exit code.

A trial is OK (its whole pipeline finished), ERROR (its configuration failed, with the cause),
STOP (stopped early by ASHA or MO-ASHA; only when one ran) or ENDED (it ended without finishing).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ray_lt.errors import ERROR_KEY, RayLtError
from ray_lt.experiment import Experiment
from ray_lt.tracking import Tracker
from ray_lt.trial import TRIAL_INDEX
from ray_lt.tuning import scheduler_name, uses_asha


def summarize(exp: Experiment, results: Any, tracking_uri: str) -> int:
    """Print one line per trial; exit 0 when at least one trial finished."""
    asha = uses_asha(exp)
    legend = f"; STOP = stopped early by {scheduler_name(exp)}" if asha else ""
    objectives = ", ".join(f"{m} ({mode})" for m, mode in zip(exp.metrics, exp.modes, strict=True))
    print(f"\nsweep '{exp.name}': {len(results)} trials (metric {objectives}{legend})")
    ok = 0
    for result in results:
        line, finished = _trial_line(exp, result, asha)
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


def _trial_line(exp: Experiment, result: Any, asha: bool) -> tuple[str, bool]:
    """One summary line (every objective's value), and whether the trial finished with one."""
    metrics = result.metrics or {}
    cfg = {k: v for k, v in (result.config or {}).items() if not k.startswith("__")}
    value = metrics.get(exp.metrics[0])
    failed = metrics.get(ERROR_KEY)
    # a trial's last report carries "artifact" only when its whole pipeline finished
    if result.error or failed:
        status = "ERROR"
    elif "artifact" in metrics:
        status = "OK"
    else:
        status = "STOP" if asha else "ENDED"  # stopped by ASHA, or ended without finishing
    reason = f"  ({str(result.error).splitlines()[-1][:160]})" if result.error else ""
    reason = f"  ({failed[:300]})" if failed else reason
    cfg.pop("seed", None)
    shown = "  ".join(f"{m}={_shown(metrics.get(m))}" for m in exp.metrics)
    line = f"  {status:5s} {shown}  seed={_seed_of(exp, result)} {cfg}{reason}"
    return line, result.error is None and value is not None


def _shown(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else value


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
