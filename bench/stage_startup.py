"""Where a ``TorchTrainer`` fit's start-up goes: a profile of an empty fit, phase by phase.

An empty training function (it reports once and returns) runs in a fresh 1-worker fit, several
times, on an in-process Ray. Each phase is read from clocks that need no Ray internals: the
processes' creation times (``psutil``), the worker's own clock when its function starts and
ends, and the driver's clock around ``fit()``.

    python bench/stage_startup.py --fits 3
    python bench/stage_startup.py --fits 3 --health-check 2.0     # Ray Train's default

Phases: the controller's process appears; the worker's process appears; the worker's function
starts (imports, the process group, the checkpoint restore are in between); the function ends;
``fit()`` returns (the controller notices and tears the group down).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def _empty_stage(config: dict) -> dict:
    import ray.train

    began = time.time()
    ray.train.report({"epoch": 1})
    return {"began": began, "ended": time.time()}


def _created(name: str, after: float) -> float | None:
    """Creation time of the newest process whose title names ``name``, started after ``after``."""
    import psutil

    times = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if name in cmd and proc.info["create_time"] >= after - 1:
            times.append(proc.info["create_time"])
    return max(times) if times else None


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
    controller = _created("TrainController", start)
    worker = _created("RayTrainWorker", start)
    return {
        "controller process": (controller or start) - start,
        "worker process": (worker or start) - start,
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


if __name__ == "__main__":
    main()
