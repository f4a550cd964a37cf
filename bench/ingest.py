"""Decoded images/s per CPU core: Ray Data against a torch DataLoader, same transforms, one run.

Every arm runs ``ray_lt.data.decode``'s ImageNet train transform (JPEG decode, with libjpeg's
reduced-scale decode where the crop allows it, ``RandomResizedCrop(224)`` bilinear, horizontal
flip) on the same files with the same per-row seeds, so every arm produces the same bytes (checked
on the warm-up pass):

* C: a plain single-process loop over ``decode_batch`` (the per-core reference), plus the eval
  transform, JPEG decode alone, and ``load_rgb`` (full-scale decode) + ``train_crop``;
* A: a ``torch.utils.data.DataLoader`` with W worker processes, batch 64, uint8 tensors;
* B: Ray Data: ``from_items`` -> ``map_batches(decode_rows, num_cpus=1)`` ->
  ``iter_torch_batches(64)``, in-process Ray with W CPUs.

One warm-up pass per arm (not timed), then ``--repeats`` timed passes; a pass's time runs from
building the iterator to the last batch in hand. The images are generated (ImageNet-like sizes,
smooth random content, quality 90) unless ``--images`` names a folder of real JPEGs.

    python bench/ingest.py
    python bench/ingest.py --images /data/imagenet/val --n 4096 --write
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features

from ray_lt.data.decode import (
    RESIZE_RATIO,
    decode_batch,
    decode_rows,
    load_rgb,
    random_resized_crop_box,
    train_crop,
)

SECTION = (
    "## Ingest: JPEG decode + ImageNet train transform, images/s per CPU core (bench/ingest.py)"
)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SEED_BASE = 1_000_003

# aspect ratios (width / height) with weights, roughly ImageNet's mix of landscape and portrait
_ASPECTS = ((4 / 3, 0.5), (3 / 4, 0.15), (3 / 2, 0.1), (2 / 3, 0.05), (1.0, 0.1), (16 / 9, 0.1))


# --- data ----------------------------------------------------------------------------------------


def _smooth_image(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Random content at four scales (broad shapes, texture, detail, grain), like a photo: about
    90 KiB at 500x375 and quality 90, near ImageNet's average JPEG."""
    acc = np.zeros((h, w, 3), np.float32)
    for cell, weight in ((48, 0.5), (12, 0.25), (3, 0.15), (1, 0.1)):
        grid = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
        if cell == 1:
            acc += weight * grid[:h, :w].astype(np.float32)
            continue
        layer = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
        acc += weight * np.asarray(layer, np.float32)
    lo, hi = np.percentile(acc, (1, 99))
    acc = (acc - lo) * (255.0 / max(hi - lo, 1.0))
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))


def make_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """Write ``n`` JPEGs (quality 90) of ImageNet-like size into ``root``; relative paths."""
    rng = np.random.default_rng(seed)
    aspects, weights = zip(*_ASPECTS, strict=True)
    rel = []
    for i in range(n):
        long_side = 500 if rng.random() < 0.75 else int(rng.integers(333, 641))
        a = aspects[rng.choice(len(aspects), p=np.asarray(weights) / sum(weights))]
        w, h = (long_side, round(long_side / a)) if a >= 1 else (round(long_side * a), long_side)
        name = f"{i // 256:03d}/img_{i:06d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _smooth_image(w, h, rng).save(root / name, quality=90)
        rel.append(name)
    return rel


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def find_images(root: Path, n: int) -> list[str]:
    found = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()
    )
    if not found:
        sys.exit(f"no *.jpg / *.JPEG files under {root}")
    return found[:n]


# --- arms ---------------------------------------------------------------------------------------


def seeds_for(epoch: int, n: int) -> np.ndarray:
    """Row i's seed in pass ``epoch``: every arm's pass ``epoch`` decodes the same crops."""
    return SEED_BASE + epoch * n + np.arange(n, dtype=np.int64)


def checksums(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """One int64 per image (position-weighted, so a flip or shift changes it)."""
    x = torch.as_tensor(images).cpu().reshape(len(images), -1).to(torch.int64)
    w = torch.arange(1, x.shape[1] + 1, dtype=torch.int64) % 251
    return (x * w).sum(1).numpy()


def _tree_cpu() -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) of this process and every live descendant (DataLoader
    workers; Ray's GCS, raylet and workers), keyed by (pid, start time)."""
    try:
        import psutil
    except ImportError:
        return {}
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[(proc.pid, proc.create_time())] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _cpu_between(before: dict, after: dict) -> float | None:
    if not after:
        return None
    return sum(v - before.get(k, 0.0) for k, v in after.items())


def timed_passes(run_pass: Callable[[int], np.ndarray | None], repeats: int) -> tuple:
    """Warm-up pass (epoch 0, returns its checksums), then timed passes: (checksums, wall
    seconds per pass, CPU seconds per pass or None without psutil)."""
    sums = run_pass(0)
    times, cpus = [], []
    for epoch in range(1, repeats + 1):
        cpu0 = _tree_cpu()
        tic = time.perf_counter()
        run_pass(epoch)
        times.append(time.perf_counter() - tic)
        cpus.append(_cpu_between(cpu0, _tree_cpu()))
    return sums, times, (None if None in cpus else cpus)


def arm_single(root: str, rel: list[str], batch: int, size: int, mode: str):
    """C: one process, chunks of ``batch`` rows through ``decode_batch`` (or a variant)."""
    paths = [os.path.join(root, p) for p in rel]
    n = len(paths)

    def run_pass(epoch: int) -> np.ndarray | None:
        seeds = seeds_for(epoch, n)
        sums = []
        for lo in range(0, n, batch):
            chunk, s = paths[lo : lo + batch], seeds[lo : lo + batch]
            if mode == "train":
                x = decode_batch(chunk, size=size, train=True, seeds=s)
            elif mode == "eval":
                x = decode_batch(chunk, size=size, train=False)
            elif mode == "load_rgb":
                x = np.stack(
                    [
                        train_crop(load_rgb(p), size, np.random.default_rng(int(k)))
                        for p, k in zip(chunk, s, strict=True)
                    ]
                )
            else:  # "decode": JPEG decode to RGB only, no transform
                for p in chunk:
                    load_rgb(p)
                continue
            if epoch == 0 and mode == "train":
                sums.append(checksums(x))
        return np.concatenate(sums) if sums else None

    return run_pass


class _Rows(torch.utils.data.Dataset):
    """Row ``k`` (from ``_EpochRows``) is file ``k % n`` with seed ``SEED_BASE + k``."""

    def __init__(self, root: str, rel: list[str], size: int) -> None:
        self.paths = [os.path.join(root, p) for p in rel]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> tuple[np.ndarray, int]:
        i = k % len(self.paths)
        x = decode_batch([self.paths[i]], size=self.size, train=True, seeds=[SEED_BASE + k])
        return x[0], i


class _EpochRows(torch.utils.data.Sampler):
    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.epoch * self.n, (self.epoch + 1) * self.n))


def _collate(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, idx = zip(*items, strict=True)
    return torch.from_numpy(np.stack(images)), torch.tensor(idx, dtype=torch.int64)


def arm_dataloader(root: str, rel: list[str], batch: int, size: int, workers: int, cuda: bool):
    """A: DataLoader with ``workers`` processes (persistent), batch ``batch``, uint8 tensors."""
    n = len(rel)
    sampler = _EpochRows(n)
    loader = torch.utils.data.DataLoader(
        _Rows(root, rel, size),
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=cuda,
        persistent_workers=workers > 0,
    )
    device = torch.device("cuda" if cuda else "cpu")

    def run_pass(epoch: int) -> np.ndarray | None:
        sampler.epoch = epoch
        sums = np.zeros(n, np.int64)
        seen = 0
        for x, idx in loader:
            x = x.to(device, non_blocking=True)
            seen += len(idx)
            if epoch == 0:
                sums[idx.numpy()] = checksums(x)
        if cuda:
            torch.cuda.synchronize()
        assert seen == n, (seen, n)
        return sums if epoch == 0 else None

    return loader, run_pass


def arm_ray(root: str, rel: list[str], batch: int, size: int, cuda: bool):
    """B: Ray Data ``from_items`` -> ``map_batches(decode_rows)`` -> ``iter_torch_batches``."""
    import ray

    n = len(rel)
    labels = np.arange(n, dtype=np.int64) % 1000
    kwargs = {"image_root": root, "size": size, "train": True}

    def run_pass(epoch: int) -> np.ndarray | None:
        seeds = seeds_for(epoch, n)
        rows = [
            {"path": rel[i], "seed": int(seeds[i]), "label": int(labels[i]), "idx": i}
            for i in range(n)
        ]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(n / batch)))
        ds = ds.map_batches(
            decode_rows, fn_kwargs=kwargs, batch_size=batch, num_cpus=1, batch_format="numpy"
        )
        sums = np.zeros(n, np.int64)
        seen = 0
        for b in ds.iter_torch_batches(
            batch_size=batch, pin_memory=cuda, device="cuda" if cuda else "cpu"
        ):
            seen += len(b["idx"])
            if epoch == 0:
                sums[b["idx"].cpu().numpy()] = checksums(b["image"])
        if cuda:
            torch.cuda.synchronize()
        assert seen == n, (seen, n)
        return sums if epoch == 0 else None

    return run_pass


# --- report -------------------------------------------------------------------------------------


def draft_share(sizes: list[tuple[int, int]], size: int, repeats: int) -> float:
    """Share of the timed passes' train crops whose box keeps >= 2 * size pixels each way, i.e.
    that ``decode`` asks libjpeg to decode at a reduced scale."""
    hits = total = 0
    for epoch in range(1, repeats + 1):
        for (w, h), seed in zip(sizes, seeds_for(epoch, len(sizes)), strict=True):
            _, _, cw, ch = random_resized_crop_box(w, h, np.random.default_rng(int(seed)))
            hits += min(cw, ch) >= 2 * size
            total += 1
    return hits / total


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_section(text: str) -> None:
    """Replace this bench's section of RESULTS.md (or append it), leaving the rest as it was."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old + ("" if old.endswith("\n\n") else "\n" if old.endswith("\n") else "\n\n") + text
    else:
        nxt = re.search(r"^## ", old[start + len(SECTION) :], flags=re.M)
        end = len(old) if nxt is None else start + len(SECTION) + nxt.start()
        tail = old[end:]
        new = old[:start] + text + ("\n" + tail if tail else "")
    RESULTS.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024, help="images (generated, or the first n found)")
    p.add_argument("--images", help="a folder of real JPEGs (searched recursively)")
    p.add_argument("--data", help="generate the images here (or reuse them) instead of a tmpdir")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--write", action="store_true", help="put the results into bench/RESULTS.md")
    p.add_argument("--note", default="", help="a sentence to add to the written section")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # one local node: no token warning
    cuda = torch.cuda.is_available()
    tmp = None
    if args.images:
        root = Path(args.images).resolve()
        rel = find_images(root, args.n)
        source = f"{len(rel)} JPEGs from {root}"
    else:
        if args.data:
            root = Path(args.data).resolve()
            root.mkdir(parents=True, exist_ok=True)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="ingest_")
            root = Path(tmp.name)
        want = [f"{i // 256:03d}/img_{i:06d}.jpg" for i in range(args.n)]
        if all((root / r).exists() for r in want):
            rel = want
        else:
            tic = time.perf_counter()
            rel = make_images(root, args.n)
            print(f"generated {args.n} JPEGs in {time.perf_counter() - tic:.1f} s", flush=True)
        source = f"{len(rel)} generated JPEGs"
    sizes = [_size(root / r) for r in rel]
    mean_kb = statistics.mean((root / r).stat().st_size for r in rel) / 1024
    mean_w = statistics.mean(s[0] for s in sizes)
    mean_h = statistics.mean(s[1] for s in sizes)
    source += f" (mean {mean_w:.0f}x{mean_h:.0f} px, {mean_kb:.0f} KiB)"
    n, w, b, size = len(rel), args.workers, args.batch, args.size
    rows: list[dict] = []
    timed = functools.partial(timed_passes, repeats=args.repeats)

    def add(arm: str, name: str, cores: int, measured: tuple) -> np.ndarray | None:
        sums, times, cpus = measured
        rates = [n / t for t in times]
        rate = statistics.median(rates)
        per_cpu_s = n * len(cpus) / sum(cpus) if cpus else None
        rows.append(
            {"arm": arm, "name": name, "cores": cores, "rate": rate, "lo": min(rates)}
            | {"hi": max(rates), "per_core": rate / cores, "per_cpu_s": per_cpu_s}
        )
        tail = f"{per_cpu_s:7.0f} /CPU-s" if per_cpu_s else ""
        print(f"{arm} {name:58s} {rate:6.0f} img/s {rate / cores:6.0f} /core {tail}", flush=True)
        return sums

    print(f"{source}; {n} images x ({args.repeats} timed + 1 warm-up) passes per arm", flush=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    single = functools.partial(arm_single, str(root), rel, b, size)
    ref_sums = add("C", "single-process loop, train transform", 1, timed(single("train")))
    add(
        "C",
        f"single-process loop, eval transform (resize {round(size * RESIZE_RATIO)})",
        1,
        timed(single("eval")),
    )
    add(
        "C",
        "single-process loop, `load_rgb` (no draft) + `train_crop`",
        1,
        timed(single("load_rgb")),
    )
    add("C", "single-process loop, JPEG decode to RGB only", 1, timed(single("decode")))

    loader, run_pass = arm_dataloader(str(root), rel, b, size, w, cuda)
    sums_a = add(
        "A", f"DataLoader({w} workers), b{b}{', pinned' if cuda else ''}", w, timed(run_pass)
    )
    del loader, run_pass  # stop the persistent workers before Ray starts

    import ray

    ray.init(address="local", num_cpus=w, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    try:
        measured = timed(arm_ray(str(root), rel, b, size, cuda))
    finally:
        ray.shutdown()
    sums_b = add("B", f"Ray Data `map_batches` -> `iter_torch_batches`, b{b}", w, measured)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    same = np.array_equal(ref_sums, sums_a) and np.array_equal(ref_sums, sums_b)
    print(f"arms produced identical images: {same}; {wall:.0f} s for all arms", flush=True)
    drafted = draft_share(sizes, size, args.repeats)

    c, dec, dl, rd = rows[0], rows[3], rows[4], rows[5]
    has_cpu = all(r["per_cpu_s"] for r in rows)
    head = "| arm | pipeline | cores | images/s (median; range) | per core | vs C train |"
    rule = "|---|---|---:|---:|---:|---:|"
    if has_cpu:
        head += " images per CPU-second | vs C train |"
        rule += "---:|---:|"
    table = [head, rule]
    for r in rows:
        line = (
            f"| {r['arm']} | {r['name']} | {r['cores']} | {r['rate']:.0f} "
            f"({r['lo']:.0f}–{r['hi']:.0f}) | {r['per_core']:.0f} "
            f"| {r['per_core'] / c['per_core']:.2f}x |"
        )
        if has_cpu:
            line += f" {r['per_cpu_s']:.0f} | {r['per_cpu_s'] / c['per_cpu_s']:.2f}x |"
        table.append(line)
    ratio = rd["rate"] / dl["rate"]
    verdict = f"Ray Data / DataLoader (same {w} cores): **{ratio:.2f}x** in images/s"
    if has_cpu:
        verdict += f", **{rd['per_cpu_s'] / dl['per_cpu_s']:.2f}x** in images per CPU-second"
    table += ["", verdict + "."]
    print("\n" + "\n".join(table))
    if not args.write:
        if tmp is not None:
            tmp.cleanup()
        return

    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    cmd = f"python bench/ingest.py{' ' + argv if argv else ''}"
    machine = (
        f"{cpu_model()}, {os.cpu_count()} cores, "
        f"{torch.cuda.get_device_name() if cuda else 'no GPU'}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
        f"Pillow {Image.__version__} (libjpeg-turbo "
        f"{'yes' if features.check_feature('libjpeg_turbo') else 'no'}), "
        f"{time.strftime('%Y-%m-%d')}"
    )
    checked = "checked" if same else "NOT identical: investigate"
    intro = (
        f"{source}, decoded to uint8 [3, {size}, {size}] by `ray_lt.data.decode`'s ImageNet "
        f"train transform (`RandomResizedCrop({size})` bilinear + flip; a JPEG is decoded at "
        "1/2, 1/4 or 1/8 scale when the crop keeps enough pixels, which happened for "
        f"{drafted:.0%} of these crops). Every arm reads the same files with the same per-row "
        f"seeds and so produces the same bytes ({checked}). {args.repeats} timed passes per "
        "arm after one untimed warm-up; a pass runs from building the iterator to the last "
        f"batch in hand. Per core = images/s ÷ the cores the arm may use (W = {w}). Images "
        "per CPU-second counts the CPU time of every process of the arm (the DataLoader's "
        "workers; Ray's GCS, raylet and workers), so other load on the machine affects it less."
    )
    limits = (
        f"One core decodes {dec['per_core']:.0f} of these JPEGs/s to RGB and runs the whole "
        f"train transform at {c['per_core']:.0f}/s: the JPEG decode is about "
        f"{c['per_core'] / dec['per_core']:.0%} of an image's time and the antialiased "
        "bilinear crop-resize most of the rest, so per core the transform itself is the limit."
    )
    if has_cpu:
        limits += (
            f" Per CPU-second the DataLoader keeps {dl['per_cpu_s'] / c['per_cpu_s']:.0%} of "
            f"the single-process rate and Ray Data {rd['per_cpu_s'] / c['per_cpu_s']:.0%} "
            "(the rest goes to moving each batch from the workers to the consumer and "
            "collating it and, for Ray, to its own processes and the blocks' trips through the "
            "object store)."
        )
    limits += (
        f" The wall-clock per-core figures of A and B also depend on what else runs: the "
        f"machine's 1-minute load average was {load0:.1f} before the run and {load1:.1f} "
        f"after, and A and B need {'both' if w == 2 else f'all {w}'} cores while C needs one."
    )
    text = "\n".join(
        [
            SECTION,
            "",
            textwrap.fill(intro, 99),
            "",
            f"### {machine}",
            "",
            f"`{cmd}` ({wall:.0f} s for all arms)",
            "",
            *table,
            "",
            textwrap.fill(limits, 99),
            *(["", textwrap.fill(args.note, 99)] if args.note else []),
            "",
        ]
    )
    write_section(text)
    print(f"wrote the section to {RESULTS}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
