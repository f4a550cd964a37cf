"""Where a ``TorchTrainer`` fit's start-up goes: a profile of an empty fit, phase by phase.

An empty training function (it reports once and returns) runs in a fresh 1-worker fit, several
times, on an in-process Ray: the driver's clock around ``fit()`` and the worker's own clock when
its function starts and ends split the fit into start-up, the function and tear-down. Ray runs
actors in worker processes it has already started, so start-up is mostly imports: the
controller's and the training worker's, which are timed alone, each in a fresh interpreter.

    python bench/stage_startup.py --fits 3
    python bench/stage_startup.py --fits 3 --health-check 2.0     # Ray Train's default

Phases: the worker's function starts (the controller's and the worker's imports, the placement
group, the process group are in between); the function ends; ``fit()`` returns (the controller
notices, with its health-check period, and tears the group down).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def _empty_stage(config: dict) -> dict:
    import ray.train

    began = time.time()
    ray.train.report({"epoch": 1})
    return {"began": began, "ended": time.time()}


IMPORTS = {
    "import torch (a training worker)": "import torch",
    "import ray.train.torch (a training worker)": "import ray.train.torch",
    "import Train's controller": "import ray.train.v2._internal.execution.controller",
}


def import_seconds(statement: str) -> float:
    """Seconds a fresh interpreter takes to run ``statement`` (as a new actor process would)."""
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - tic


def one_fit(storage: str, index: int) -> dict[str, float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    start = time.time()
    trainer = TorchTrainer(
        _empty_stage,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=storage, name=f"fit{index}"),
    )
    result = trainer.fit()
    returned = time.time()
    times = result.return_value
    return {
        "worker function starts": times["began"] - start,
        "function runs": times["ended"] - times["began"],
        "fit() returns": returned - start,
        "tear-down": returned - times["ended"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--health-check", default="0.5", help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    args = p.parse_args()
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = args.health_check
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        rows = [one_fit(storage, i) for i in range(args.fits)]
    ray.shutdown()
    print(f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, ", end="")
    print(f"health check every {args.health_check} s, {args.fits} fits (median, seconds)")
    print("| phase (seconds after fit() is called) | median |\n|---|---:|")
    for phase in rows[0]:
        print(f"| {phase} | {statistics.median(r[phase] for r in rows):.1f} |")
    print("| (alone, in a fresh interpreter) | |")
    for name, statement in IMPORTS.items():
        print(f"| {name} | {import_seconds(statement):.1f} |")


if __name__ == "__main__":
    main()
