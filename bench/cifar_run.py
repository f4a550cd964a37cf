"""Run CIFAR-100-LT pipelines at the full recipes in one process on one device, without Ray.

For machines where Ray is not installed (the lent GPU machine): the same pipelines, artifact
store, engine and stage objectives as ``python -m ray_lt.sweep``, each stage trained in this
process (``TrialContext(in_process=device)``). Stages already in the store are reused, so
processes that share a store (several seeds, teachers first) never train a stage twice. Several
processes share one GPU.

Targets: ``ce``, ``crt``, ``lws``, ``teacher:<name>`` (a CBD teacher, e.g. ``teacher:vanilla1``),
``cbd:<teachers>:<alpha>`` (a CBD student, e.g. ``cbd:vanilla1+vanilla2:0.4``; ``cbd::0``
is class-balanced training from scratch), ``ssd[:k=v,...]`` (SSD-LT's final stage from
``ray_lt.recipes.ssd_lt.ssd_lt``, e.g. ``ssd:finetune=True``) and ``cbe[:k=v,...]`` (CBE's
calibration from ``ray_lt.recipes.cbe.cbe``, e.g. ``cbe:calibration='prior'``).

    python bench/cifar_run.py --seed 0 --device cuda --data-root DATA --store S ce crt lws
"""

from __future__ import annotations

import argparse
import ast
import json
import time

from ray_lt.pipeline import TrialContext, run_pipeline
from ray_lt.recipes import BASELINES, baseline, cbd, cbd_teacher
from ray_lt.spec import StageSpec


def _kwargs(text: str) -> dict:
    """``a=1,b='x'`` -> {"a": 1, "b": "x"} (Python literals)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        out[name.strip()] = ast.literal_eval(value.strip())
    return out


def target_spec(target: str, seed: int) -> StageSpec:
    if target in BASELINES:
        return baseline(target, seed)
    kind, _, rest = target.partition(":")
    if kind == "teacher":
        return cbd_teacher(rest)
    if kind == "cbd":
        teachers, _, alpha = rest.partition(":")
        return cbd(teachers, seed, alpha=float(alpha or 0.4))
    if kind == "ssd":
        from ray_lt.recipes.ssd_lt import ssd_lt

        return ssd_lt(seed, **_kwargs(rest))
    if kind == "cbe":
        from ray_lt.recipes.cbe import cbe

        return cbe(seed, **_kwargs(rest))
    raise SystemExit(
        f"unknown target '{target}'; use ce, crt, lws, teacher:NAME, cbd:T:ALPHA, ssd[:k=v] "
        "or cbe[:k=v]"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-root", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()
    ctx = TrialContext(store_uri=args.store, data_root=args.data_root, in_process=args.device)
    results = {}
    for target in args.targets:
        tic = time.perf_counter()
        outcome = run_pipeline(target_spec(target, args.seed), ctx)[-1]
        metrics = outcome.artifact.metrics()
        results[target] = {
            "test": metrics["test"],
            "val": metrics.get("val", {}),
            "seconds": time.perf_counter() - tic,
            "key": outcome.artifact.key,
            "reused": outcome.reused,
        }
        print(target, json.dumps(results[target]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"seed": args.seed, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
