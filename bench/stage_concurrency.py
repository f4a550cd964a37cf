"""How many stages train at once in a sweep whose trials share upstream stages.

Runs one experiment's smoke sweep through the real CLI, twice in one run on one machine: with
this checkout, and with a baseline checkout (``--baseline-tree``, e.g. a ``git worktree`` of an
older commit) on ``PYTHONPATH``. For every stage the store holds, its training window is read
from the artifact: it ends when the artifact was published (the manifest's time) and lasted the
sum of its epochs' times. From the windows: the sweep's wall time, the most stages training at
once, and the mean number training at once while any is.

    git worktree add /tmp/before <commit>
    python bench/stage_concurrency.py experiments/cbd_ens.py --baseline-tree /tmp/before
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def windows(store: Path) -> list[tuple[float, float, str]]:
    """(start, end, key) of every stage the store holds: its training time before publication."""
    from ray_lt.artifacts import ArtifactStore
    from ray_lt.store_layout import MANIFEST

    art = ArtifactStore(store)
    out = []
    for key in art.keys():
        end = (store / key / MANIFEST).stat().st_mtime
        seconds = sum(h.get("epoch_s", 0.0) for h in art.open(key).metrics().get("history", []))
        out.append((end - seconds, end, key))
    return sorted(out)


def at_once(spans: list[tuple[float, float, str]]) -> tuple[int, float]:
    """The most windows open at once, and the mean number open while at least one is."""
    events = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    open_now, most, busy, weighted, last = 0, 0, 0.0, 0.0, None
    for t, step in events:
        if last is not None and open_now > 0:
            busy += t - last
            weighted += open_now * (t - last)
        open_now += step
        most = max(most, open_now)
        last = t
    return most, weighted / busy if busy else 0.0


def sweep(file: str, tree: str | None, workdir: Path, cpus: int) -> dict[str, float]:
    store = workdir / "store"
    # the baseline's own copy of the file: the workers import the package beside it
    path = os.path.join(tree, file) if tree else os.path.abspath(file)
    cmd = [sys.executable, "-m", "ray_lt.sweep", path, "--smoke"]
    cmd += ["--store", str(store), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    cmd += ["--num-cpus", str(cpus)]
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")])
    tic = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tree or None, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    spans = windows(store)
    most, mean = at_once(spans)
    return {"wall_s": wall, "stages": len(spans), "most_at_once": most, "mean_at_once": mean}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", help="an experiment file with a smoke variant, relative to the root")
    p.add_argument("--baseline-tree", help="a checkout to compare with (on PYTHONPATH)")
    p.add_argument(
        "--num-cpus",
        type=int,
        default=2,
        help="CPUs Ray may use: a trial takes one and its stage worker one, so 4 lets two "
        "trials run at once (on 2 cores they then share them)",
    )
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("baseline", args.baseline_tree)] if args.baseline_tree else []
        for name, tree in [*runs, ("this checkout", None)]:
            (Path(tmp) / name).mkdir()
            rows[name] = sweep(args.file, tree, Path(tmp) / name, args.num_cpus)
            print(name, {k: round(v, 2) for k, v in rows[name].items()}, flush=True)
    print(
        f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {args.file} --smoke"
        f" --num-cpus {args.num_cpus}"
    )
    print("| checkout | sweep wall s | stages trained | most at once | mean at once | wall vs "
          "baseline |\n|---|---:|---:|---:|---:|---:|")  # fmt: skip
    base = rows.get("baseline", {}).get("wall_s")
    for name, r in rows.items():
        ratio = f"{r['wall_s'] / base:.2f}x" if base else "-"
        print(
            f"| {name} | {r['wall_s']:.0f} | {r['stages']:.0f} | {r['most_at_once']:.0f} | "
            f"{r['mean_at_once']:.2f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
