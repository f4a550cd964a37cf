"""Training images/s of the engine against a reference-style pipeline, same model, one run.

Reference: what the seeds' repositories do (torchvision transforms on PIL images, a DataLoader
with worker processes, fp32). Engine: ``ray_lt.engine.run_stage`` with the data on the device as
uint8, sampling and crop/flip batched there, bf16 autocast and channels_last on CUDA (each
switchable). The same ResNet, batch size, SGD and data; throughput is the median of the epochs
after the first (warm-up), training only (no evaluation).

    python bench/engine_throughput.py --device cuda --data cifar100_lt --data-root .gpu_data
    python bench/engine_throughput.py --device cpu --data synthetic_lt --epochs 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ray_lt.data import DataSpec, load_dataset
from ray_lt.engine import LocalSession, StageRun, run_stage
from ray_lt.models import create_model
from ray_lt.objective import get_objective
from ray_lt.spec import StageSpec, TrainSpec


def engine_rate(data_spec, ds, device, epochs, batch, backbone, amp, channels_last) -> float:
    spec = StageSpec(
        kind="ce",
        data=data_spec,
        train=TrainSpec(
            epochs=epochs,
            batch_size=batch,
            lr=0.05,
            schedule="cosine",
            eval_every=10**6,
            amp=amp,
            channels_last=channels_last,
        ),
        params={"backbone": backbone},
    )
    session = LocalSession(device)
    run_stage(StageRun(spec=spec, objective=get_objective("ce"), data=ds), session)
    return statistics.median(r["images_per_s"] for r in session.reports[1:])


def reference_rate(ds, device, epochs, batch, backbone, workers) -> float:
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(ds.mean, ds.std),
        ]
    )

    class Images(Dataset):
        def __len__(self) -> int:
            return len(ds.train.labels)

        def __getitem__(self, i: int):
            img = Image.fromarray(ds.train.images[i].transpose(1, 2, 0))
            return tf(img), int(ds.train.labels[i])

    loader = DataLoader(
        Images(),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    model = create_model(backbone, ds.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    model.train()
    rates = []
    for _ in range(epochs):
        tic, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _, logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - tic))
    return statistics.median(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="synthetic_lt")
    p.add_argument("--data-root")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--backbone", default="resnet32")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--large-batch", type=int, default=512)
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()
    device = torch.device(args.device)
    data_spec = DataSpec(name=args.data, imbalance=100.0)
    ds = load_dataset(data_spec, args.data_root)
    cuda = device.type == "cuda"
    rows = []

    def add(name: str, rate: float) -> None:
        rows.append({"pipeline": name, "images_per_s": rate})
        print(f"{name:58s} {rate:10.0f} img/s", flush=True)

    common = (data_spec, ds, device, args.epochs)
    ref = reference_rate(ds, device, args.epochs, args.batch, args.backbone, args.workers)
    add(f"reference: torchvision + DataLoader({args.workers} workers), fp32, b{args.batch}", ref)
    add(
        f"engine: fp32, b{args.batch}",
        engine_rate(*common, args.batch, args.backbone, False, False),
    )
    if cuda:
        add(
            f"engine: bf16 + channels_last, b{args.batch}",
            engine_rate(*common, args.batch, args.backbone, True, True),
        )
        add(
            f"engine: bf16, b{args.batch}",
            engine_rate(*common, args.batch, args.backbone, True, False),
        )
    if args.large_batch:
        add(
            f"engine: {'bf16 + channels_last' if cuda else 'fp32'}, b{args.large_batch}",
            engine_rate(*common, args.large_batch, args.backbone, cuda, cuda),
        )
    machine = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(
        f"\n{args.backbone}, {args.data} ({len(ds.train.labels)} train images), {machine}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    print("| pipeline | images/s | vs reference |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['pipeline']} | {r['images_per_s']:.0f} | {r['images_per_s'] / ref:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "torch": torch.__version__,
                    "rows": rows,
                    "args": vars(args),
                    "train_images": int(len(ds.train.labels)),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
