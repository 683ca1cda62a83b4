"""Test helper: shards in the generate stage's format, holding procedural shapes with real class signal.

`write_rows` is the test-only writer: rows as dicts, written by lbgen's own shard writer.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa

from lbgen.data.classes import ClassTable
from lbgen.data.downstream import SHAPE_CLASSES, render_shape
from lbgen.data.format import ARROW_SCHEMA, write_shard
from lbgen.runtime.seeds import derive_seed


def image_bytes(pil_image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """Encode a PIL image for the `image.bytes` column."""
    buffer = io.BytesIO()
    pil_image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def write_rows(path: str | Path, rows: list[dict], row_group_rows: int = 100) -> Path:
    """Write `rows` (dicts keyed by `lbgen.data.format.COLUMNS`; missing keys are null) as one whole shard."""
    write_shard(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), path, row_group_rows)
    return Path(path)


def shape_rows(table: ClassTable, per_class: int, size: int, seed: int = 0) -> list[dict]:
    """One row per image: label k of `table` shows shape class k (flat backgrounds, JPEG bytes)."""
    assert len(table) <= len(SHAPE_CLASSES)
    rows = []
    for label in range(len(table)):
        for index in range(per_class):
            image_seed = derive_seed(seed, label, index)
            image = render_shape(label, np.random.default_rng(image_seed), size)
            rows.append({
                "image": {"bytes": image_bytes(image), "path": f"{label:04d}-{index:06d}.jpg"},
                "label": label, "class_id": table.ids[label], "class_name": table.names[label],
                "prompt": table.names[label], "seed": image_seed, "index": index, "width": size, "height": size,
                "clip_score": float(index % 10) / 10, "clip_agrees": index % 2 == 0, "iqa_score": 0.5, "generator": "shapes",
            })
    return rows


def write_shape_shards(root: Path, table: ClassTable, per_class: int, size: int, num_shards: int = 2, seed: int = 0) -> Path:
    """`root/data/train-0000i-of-0000N.parquet`, rows interleaved across shards; returns `root`."""
    rows = shape_rows(table, per_class, size, seed)
    for i in range(num_shards):
        write_rows(Path(root) / "data" / f"train-{i:05d}-of-{num_shards:05d}.parquet", rows[i::num_shards])
    return Path(root)
