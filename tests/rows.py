"""Test helper: two generated rows (or datasets) are the same, up to the rounding of their CLIP/IQA outputs; and
`write_encoded`, a run's writing of encoded rows without Ray."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

# Model outputs: CLIP/IQA kernels round differently with the batch size, so these match up to rounding.
SCORES = ("clip_score", "iqa_score")
EMBEDDING = "clip_embedding"


def assert_same_row(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    """Every other column equal; scores within float32 rounding, the float16 embedding within its last bits."""
    ignore = set(skip) | set(SCORES) | {EMBEDDING}
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
    np.testing.assert_allclose([a[k] for k in SCORES], [b[k] for k in SCORES], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a[EMBEDDING], b[EMBEDDING], rtol=0, atol=2e-3)


def read_rows(output: Path) -> dict:
    """(label, index) -> row dict with decoded pixels, from all shards; no (label, index) twice."""
    table = pq.read_table(output / "data")
    rows = {}
    for row in table.to_pylist():
        row["pixels"] = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        key = (row["label"], row["index"])
        assert key not in rows, f"duplicate row {key}"
        rows[key] = row
    return rows


def assert_same_pixels_and_row(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["pixels"], b["pixels"])
    assert_same_row(a, b, skip=("pixels", "image"))


def assert_same_dataset(a: Path, b: Path) -> None:
    """The same rows (keys, pixels, metadata; scores up to rounding) and the same image bytes in both datasets."""
    rows_a, rows_b = read_rows(a), read_rows(b)
    assert rows_a.keys() == rows_b.keys()
    for key in rows_a:
        assert_same_pixels_and_row(rows_a[key], rows_b[key])
        assert rows_a[key]["image"] == rows_b[key]["image"], key  # PNG encoding is deterministic too


def write_encoded(writer, batch: dict) -> None:
    """What a run does with an encoded batch, without Ray: the worker's parts, then each whole shard assembled
    and committed (`batch` holds each row's `shard` and its `position` in it)."""
    from lbgen.data.writer import assemble_shard, write_parts

    for shard, parts in writer.add_parts(write_parts(batch, **writer.part_settings())):
        writer.commit(shard, assemble_shard(str(writer.output), shard, parts, writer.plan.row_group_rows))
