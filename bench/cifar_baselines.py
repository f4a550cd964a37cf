"""CE, cRT and LWS on CIFAR-100-LT for one seed, in one process on one device, without Ray.

For machines where Ray is not installed (the lent GPU machine): the same pipeline, store, engine
and stage objectives as ``python -m ray_lt.sweep experiments/ce_crt_cifar100_lt.py``, with each
stage trained in this process (``TrialContext(in_process=device)``). Several seeds run as several
processes that share the GPU.

    python bench/cifar_baselines.py --seed 0 --device cuda --data-root .gpu_data --store /tmp/s
"""

from __future__ import annotations

import argparse
import json
import time

from ray_lt.pipeline import TrialContext, run_pipeline
from ray_lt.recipes import BASELINES, CIFAR_CE, baseline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-root", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--epochs", type=int, default=CIFAR_CE.epochs, help="CE epochs (200)")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()
    ce_train = CIFAR_CE if args.epochs == CIFAR_CE.epochs else CIFAR_CE.replace(epochs=args.epochs)
    ctx = TrialContext(store_uri=args.store, data_root=args.data_root, in_process=args.device)
    results = {}
    for method in BASELINES:
        tic = time.perf_counter()
        outcome = run_pipeline(baseline(method, args.seed, ce_train=ce_train), ctx)[-1]
        metrics = outcome.artifact.metrics()
        results[method] = {
            "test": metrics["test"],
            "val": metrics.get("val", {}),
            "seconds": time.perf_counter() - tic,
            "key": outcome.artifact.key,
            "reused": outcome.reused,
        }
        print(method, json.dumps(results[method]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seed": args.seed, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
