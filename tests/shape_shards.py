"""Test helper: shards in the generate stage's format, holding procedural shapes with real class signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lbgen.data.classes import ClassTable
from lbgen.data.downstream import SHAPE_CLASSES, render_shape
from lbgen.data.shards import image_bytes, write_shard
from lbgen.runtime.seeds import derive_seed


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
        write_shard(Path(root) / "data" / f"train-{i:05d}-of-{num_shards:05d}.parquet", rows[i::num_shards])
    return Path(root)
