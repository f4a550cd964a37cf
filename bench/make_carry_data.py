"""Write a CIFAR-100 Parquet folder small enough to travel with the checkout to a GPU machine.

Every train row stays (so the seeded long-tailed selection sees the official order), but the
PNG bytes of rows that neither the long-tailed subset nor the validation split uses are nulled:
CIFAR-100-LT IF100 plus the test set is about 47 MB instead of 134 MB.

    python bench/make_carry_data.py --src ../shared/data --dst .gpu_data --imbalance 100
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_lt.data import DataSpec, load_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="folder holding cifar100/{train,test}.parquet")
    p.add_argument("--dst", required=True)
    p.add_argument("--imbalance", type=float, nargs="+", default=[100.0])
    args = p.parse_args()
    keep: set[int] = set()
    for imbalance in args.imbalance:
        ds = load_dataset(DataSpec(name="cifar100_lt", imbalance=imbalance), args.src)
        keep.update(ds.train.source_index.tolist())
        keep.update(ds.val.source_index.tolist())
    src = Path(args.src) / "cifar100"
    dst = Path(args.dst) / "cifar100"
    dst.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(src / "train.parquet")
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[sorted(keep)] = True
    img = table.column("img").combine_chunks()
    blobs = pc.if_else(pa.array(mask), img.field("bytes"), pa.nulls(len(mask), pa.binary()))
    img = pa.StructArray.from_arrays([blobs, img.field("path")], names=["bytes", "path"])
    table = table.set_column(table.schema.get_field_index("img"), "img", img)
    pq.write_table(table, dst / "train.parquet")
    shutil.copy(src / "test.parquet", dst / "test.parquet")
    size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
    print(f"kept the bytes of {mask.sum()} of {len(mask)} train rows; {size:.1f} MiB in {dst}")


if __name__ == "__main__":
    main()
