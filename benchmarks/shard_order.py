"""Class-sorted against class-mixed shards: the same generated images pre-trained on twice, tested on real data.

    python benchmarks/shard_order.py --data runs/mini/generate --downstream runs/mini/downstream \
        --out /tmp/shard-order [--preset mini] [--shard-rows 40] [--buffer-fraction 0.1] [--seeds 0 1 2]

Writes the dataset's rows twice, byte for byte: in label-major shards, as lbgen laid out a dataset before
issue 24, and in lbgen's seeded permutation (`lbgen.data.plan.row_order`), both in shards of
`--shard-rows`. Then, per seed, `lbgen pretrain` on each with a shuffle buffer of `--buffer-fraction` of the
rows (read blocks of a shard), and `lbgen evaluate --protocol classify` of each backbone on the downstream
set's test split (the real Fashion-MNIST test images for `runs/mini/downstream`). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lbgen.data.format import shard_name, write_shard
from lbgen.data.plan import row_order


def rows_by_image(data: Path) -> tuple[pa.Table, int]:
    """Every row of the dataset at `data`, in label-major order, and its images per class."""
    table = pa.concat_tables(pq.read_table(path) for path in sorted((data / "data").glob("*.parquet")))
    table = table.sort_by([("label", "ascending"), ("index", "ascending")])
    per_class = json.loads((data / "manifest.json").read_text())["images_per_class"]
    assert table.num_rows == per_class * len(set(table.column("label").to_pylist())), "a whole dataset is needed"
    return table, per_class


def write_layout(table: pa.Table, order: np.ndarray, root: Path, shard_rows: int) -> Path:
    """`table`'s rows in `order`, as shards of `shard_rows` under `root/data`."""
    ordered = table.take(pa.array(order))
    count = -(-ordered.num_rows // shard_rows)
    for k in range(count):
        write_shard(ordered.slice(k * shard_rows, shard_rows), root / "data" / shard_name(k, count), shard_rows)
    return root


def lbgen(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lbgen.cli", *args], check=True, stdout=subprocess.DEVNULL)


def top1(backbone: Path, downstream: Path, output: Path, preset: str, seed: int) -> float:
    lbgen("evaluate", "--preset", preset, "--seed", str(seed), "--backbone", str(backbone), "--downstream", str(downstream),
          "--protocol", "classify", "--output", str(output))
    lines = (output / "classify.csv").read_text().splitlines()
    header, values = lines[0].split(","), lines[1].split(",")
    return float(values[header.index("top1")])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a whole generated dataset (lbgen generate's output)")
    parser.add_argument("--downstream", type=Path, required=True, help="the downstream set to classify (its test split)")
    parser.add_argument("--out", type=Path, required=True, help="working directory (the two layouts, backbones, results)")
    parser.add_argument("--preset", default="mini", help="preset of the pretrain and evaluate runs (default: mini)")
    parser.add_argument("--shard-rows", type=int, default=40, help="rows per shard of both layouts (default: 40)")
    parser.add_argument("--buffer-fraction", type=float, default=0.1, help="shuffle buffer as a share of the rows (default: 0.1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pre-training seeds (default: 0 1 2)")
    args = parser.parse_args(argv)

    table, per_class = rows_by_image(args.data)
    buffer = max(1, int(args.buffer_fraction * table.num_rows))
    layouts = {"class-sorted": np.arange(table.num_rows), "class-mixed": row_order(table.num_rows, 0)}
    found = {"rows": table.num_rows, "images_per_class": per_class, "shard_rows": args.shard_rows, "shuffle_buffer": buffer,
             "preset": args.preset, "top1": {name: [] for name in layouts}}
    for name, order in layouts.items():
        data = write_layout(table, order, args.out / name, args.shard_rows)
        for seed in args.seeds:
            backbone = args.out / f"{name}-pretrain-{seed}"
            lbgen("pretrain", "--preset", args.preset, "--seed", str(seed), "--data", str(data), "--output", str(backbone),
                  "--shuffle-buffer", str(buffer), "--read-block-rows", str(args.shard_rows))
            found["top1"][name].append(top1(backbone, args.downstream, args.out / f"{name}-evaluate-{seed}", args.preset, seed))
    found["mean_top1"] = {name: round(float(np.mean(values)), 2) for name, values in found["top1"].items()}
    print(json.dumps(found, indent=1))
    return found


if __name__ == "__main__":
    main()
