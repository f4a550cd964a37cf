"""Harness overhead of a sweep: seconds per trial and per stage beyond the training itself.

Runs the real CLI (``python -m ray_lt.sweep``) on tiny synthetic trials, in four shapes, in one
run on one machine: one stage per trial in a ``TorchTrainer``; the same stage inline
(``Resources(num_workers=0)``, in the trial's process); two chained stages per trial in one
worker group (the default); and the same two stages with a worker group each
(``RAY_LT_ONE_GROUP_PER_STAGE=1``, the path before worker groups were shared).
Training time is the sum of each trained stage's epoch times (``metrics.json``);
a trial's time is its MLflow run's start-to-end. Overhead = trial time - training time: Tune's
trial start, the worker group, data from the object store, publishing to the store, MLflow.

    python bench/sweep_overhead.py                       # in-process Ray on this machine
    python bench/sweep_overhead.py --address 127.0.0.1:6379 --trials 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

EXPERIMENT = textwrap.dedent(
    """
    import os
    from ray import tune
    from ray_lt.data.spec import DataSpec
    from ray_lt.experiment import Experiment
    from ray_lt.spec import Resources, StageSpec, TrainSpec

    SHAPE = os.environ["BENCH_SHAPE"]
    TRIALS = int(os.environ["BENCH_TRIALS"])
    DATA = DataSpec(name="synthetic_lt", num_classes=4, max_per_class=48, imbalance=4.0,
                    test_per_class=12, val_per_class=4)
    WORKERS = 0 if SHAPE == "inline" else 1


    def ce(seed):
        return StageSpec(kind="ce", data=DATA, params={"backbone": "resnet8"},
                         train=TrainSpec(epochs=1, batch_size=32, lr=0.05, seed=seed),
                         resources=Resources(num_workers=WORKERS))


    def pipeline(config):
        first = ce(config["variant"])
        if not SHAPE.startswith("two_stages"):
            return first
        return StageSpec(kind="crt", data=DATA, inputs={"features": first},
                         train=TrainSpec(epochs=1, batch_size=32, lr=0.05,
                                         sampler="class_balanced"),
                         resources=Resources(num_workers=WORKERS))


    experiment = Experiment(name=f"overhead-{SHAPE}", pipeline=pipeline, search="grid",
                            param_space={"variant": tune.grid_search(list(range(TRIALS)))},
                            max_concurrent_trials=2, scheduler=None)
    """
)


def run_shape(shape: str, trials: int, workdir: Path, address: str | None) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from ray_lt.artifacts import ArtifactStore

    exp_file = workdir / "overhead_experiment.py"
    exp_file.write_text(EXPERIMENT)
    store, db = workdir / f"store-{shape}", workdir / f"mlflow-{shape}.db"
    cmd = [sys.executable, "-m", "ray_lt.sweep", str(exp_file), "--store", str(store)]
    cmd += ["--tracking-uri", f"sqlite:///{db}"]
    cmd += ["--address", address] if address else ["--num-cpus", "2"]
    env = {**os.environ, "BENCH_SHAPE": shape, "BENCH_TRIALS": str(trials)}
    if shape == "two_stages_per_stage":
        env["RAY_LT_ONE_GROUP_PER_STAGE"] = "1"
    tic = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=workdir)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"{shape} sweep failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(f"overhead-{shape}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    art = ArtifactStore(store)
    train_s = {k: sum(h["epoch_s"] for h in art.open(k).metrics()["history"]) for k in art.keys()}
    trials_out, stages = [], 0
    for run in runs:
        if run.data.tags.get("ray_lt.role") != "trial":
            continue
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        trained = [
            train_s[c.data.tags["ray_lt.stage_key"]]
            for c in children
            if c.data.tags.get("ray_lt.reused") == "false"
        ]
        stages = len(children)
        trial_s = (run.info.end_time - run.info.start_time) / 1000
        trials_out.append((trial_s, sum(trained)))
    overhead = [t - s for t, s in trials_out]
    return {
        "trials": len(trials_out),
        "stages_per_trial": stages,
        "wall_s": wall,
        "trial_s": statistics.median(t for t, _ in trials_out),
        "train_s": statistics.median(s for _, s in trials_out),
        "overhead_trial_s": statistics.median(overhead),
        "overhead_stage_s": statistics.median(overhead) / max(stages, 1),
    }


def later_stage_s(rows: dict[str, dict[str, float]], two: str) -> float:
    """Overhead of a trial's second stage: the two-stage trial's minus the one-stage trial's."""
    if "trainer" not in rows or two not in rows:
        return float("nan")
    return rows[two]["overhead_trial_s"] - rows["trainer"]["overhead_trial_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--address", help="a running Ray cluster (default: in-process, 2 CPUs)")
    p.add_argument("--shapes", default="trainer,inline,two_stages_per_stage,two_stages")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            trials = args.trials if not shape.startswith("two") else max(args.trials // 2, 1)
            rows[shape] = run_shape(shape, trials, Path(tmp), args.address)
            print(shape, {k: round(v, 2) for k, v in rows[shape].items()}, flush=True)
    base = rows.get("trainer")
    machine = platform.processor() or platform.machine()
    print(f"\n{platform.node()} {machine}, {os.cpu_count()} CPUs")
    print(
        "| shape | trials | stages/trial | sweep wall s | trial s (median) | training s | "
        "overhead s/trial | overhead s/stage | vs TorchTrainer stage |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape, r in rows.items():
        ratio = r["overhead_stage_s"] / base["overhead_stage_s"] if base else float("nan")
        print(
            f"| {shape} | {r['trials']:.0f} | {r['stages_per_trial']:.0f} | {r['wall_s']:.0f} | "
            f"{r['trial_s']:.1f} | {r['train_s']:.2f} | {r['overhead_trial_s']:.1f} | "
            f"{r['overhead_stage_s']:.1f} | {ratio:.2f}x |"
        )
    old, new = later_stage_s(rows, "two_stages_per_stage"), later_stage_s(rows, "two_stages")
    print(
        f"\nsecond stage of a trial: {old:.1f} s with a worker group per stage, {new:.1f} s in "
        f"the trial's worker group ({new / old:.2f}x)"
    )


if __name__ == "__main__":
    main()
