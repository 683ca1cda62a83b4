"""Images/s per CPU of pre-training's decode stage: what sizes the CPUs that feed the GPUs.

One process, one thread (one Ray Data task's share of a CPU), the stage's own functions on
Parquet-shaped batches of 512 px JPEGs at quality 95 (what `sd15-in1k` generates), cropped to
224 px by the train recipe (random resized crop 0.08-1 + flip) and the eval recipe (centre crop):

- `full decode`: the stage before this change: every image decoded whole, then cropped
  (`transform_pixels(decode_pixels(...))`);
- `draft`: `decode_batch` as it is now: a JPEG whose eval crop is at least twice the output side
  is decoded at reduced size (`load_crop`; training crops decode whole, as before, since draft mode
  did not pay for them: 0.89-0.96x when it was tried on them);
- `plan only`: `plan_batch`, the CPU share of `pretrain.decode_device: cuda` (the header read and the
  crop drawn; nvJPEG decodes on the GPU, not measured here).

Two kinds of image: the benchmarks' shape renders (~128 KB as 512 px q95 JPEGs), and the same with
photo-like grain (Gaussian noise, sigma 6: ~150 KB); a photograph resized to 512 px at q95 takes 104 to
143 KB. Entropy decoding, which no reduced-size decode skips, grows with the bytes. The variants run interleaved, each first in turn, `--rounds` times;
the median is reported.

    .venv/bin/python benchmarks/loader_per_cpu.py --json /tmp/loader_per_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from common import json_header, log
from PIL import Image

from lbgen.data.downstream import render_shape
from lbgen.data.shards import RowFilter
from lbgen.data.transforms import ImageTransform, decode_batch, decode_pixels, image_blobs, plan_batch, transform_pixels

ALL_ROWS = RowFilter(seed=0, val_fraction=0.0)


def jpeg_rows(count: int, size: int, quality: int, grain: float) -> pa.Table:
    """`count` shape renders at `size` px as JPEG rows (image struct, label, index), with Gaussian grain of `grain`."""
    blobs = []
    for index in range(count):
        rng = np.random.default_rng(index)
        pixels = np.asarray(render_shape(index % 10, rng, size), dtype=np.float32)
        if grain:
            pixels = np.clip(pixels + rng.normal(0, grain, pixels.shape), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    return pa.table({"image": pa.array(blobs), "label": pa.array(np.arange(count) % 10, pa.int64()),
                     "index": pa.array(np.arange(count), pa.int64())})


def full_decode_batch(table: pa.Table, spec: ImageTransform, rows: RowFilter, split: str, seed=None) -> dict:
    """The stage before reduced-size decoding (`decode_batch` as it was): every image decoded whole, then the recipe."""
    table = rows.select(table, split)
    rng = np.random.default_rng(seed)
    images = np.stack([transform_pixels(decode_pixels(blob), spec, rng) for blob in image_blobs(table.column("image"))])
    return {"image": images, "label": table.column("label").to_numpy()}


VARIANTS = {"full decode": full_decode_batch, "draft": decode_batch, "plan only": plan_batch}


def images_per_s(stage, table: pa.Table, spec: ImageTransform, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, table.num_rows, batch):
        stage(table.slice(start, batch), spec, ALL_ROWS, "train", seed=start)
    return table.num_rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="JPEGs per kind")
    parser.add_argument("--size", type=int, default=512, help="side of the stored JPEGs")
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--crop", type=int, default=224, help="training crop side")
    parser.add_argument("--batch", type=int, default=64, help="rows per stage call (pretrain.decode_batch_size)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; the median is reported")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results = []
    for kind, grain in (("shapes", 0.0), ("shapes + grain", 6.0)):
        table = jpeg_rows(args.images, args.size, args.quality, grain)
        kilobytes = float(np.mean([len(b) for b in image_blobs(table.column("image"))]) / 1000)
        for recipe, train in (("train", True), ("eval", False)):
            spec = ImageTransform(args.crop, train)
            rates = {name: [] for name in VARIANTS}
            for stage in VARIANTS.values():  # warm-up: imports, allocator, page cache
                images_per_s(stage, table.slice(0, args.batch), spec, args.batch)
            names = list(VARIANTS)
            for round_ in range(args.rounds):
                for name in names[round_ % 3:] + names[:round_ % 3]:  # each variant first in turn
                    rates[name].append(images_per_s(VARIANTS[name], table, spec, args.batch))
            medians = {name: float(np.median(r)) for name, r in rates.items()}
            row = {"images": kind, "jpeg_kb": round(kilobytes, 1), "recipe": recipe,
                   **{f"{name} images/s per CPU": round(rate) for name, rate in medians.items()},
                   "draft / full": round(medians["draft"] / medians["full decode"], 2),
                   "plan only / full": round(medians["plan only"] / medians["full decode"], 1)}
            log(json.dumps(row))
            results.append(row)

    document = json_header(images=args.images, size=args.size, quality=args.quality, crop=args.crop, rounds=args.rounds, results=results)
    print(json.dumps(document, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
