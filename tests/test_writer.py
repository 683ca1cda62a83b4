"""lbgen.data.writer: the writer's claim on its output, parts and shard assembly in any order, resume."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from rows import write_encoded

from lbgen.data.format import ARROW_SCHEMA, DATA_DIR, MANIFEST, PARTS_DIR, shard_name
from lbgen.data.images import encode_images
from lbgen.data.reader import dataset_complete, read_manifest
from lbgen.data.writer import DatasetPlan, DatasetWriter, assemble_shard, write_parts
from lbgen.errors import DatasetError

NAMES = ["cat", "dog", "owl"]
PER_CLASS, ROWS_PER_SHARD, DIM = 4, 5, 6


# ---------------------------------------------------------------- DatasetWriter, without models or Ray


def plan_of(content: dict | None = None) -> DatasetPlan:
    total = len(NAMES) * PER_CLASS
    rows = [min(ROWS_PER_SHARD, total - start) for start in range(0, total, ROWS_PER_SHARD)]
    return DatasetPlan(content=content or {"seed": 0}, label_names=NAMES, images_per_class=PER_CLASS, shard_rows=rows,
                       generator="test", description="three classes", row_group_rows=2)


def encoded_rows() -> dict[str, np.ndarray]:
    """Every row of `plan_of()`, label-major, as the encode stage hands them to the driver."""
    rng = np.random.default_rng(0)
    position = np.arange(len(NAMES) * PER_CLASS)
    label, index = position // PER_CLASS, position % PER_CLASS
    batch = {
        "label": label, "index": index, "shard": position // ROWS_PER_SHARD, "position": position % ROWS_PER_SHARD,
        "class_id": np.array([f"n{i}" for i in label], dtype=object), "class_name": np.array([NAMES[i] for i in label], dtype=object),
        "prompt": np.array([NAMES[i] for i in label], dtype=object), "seed": position * 7,
        "pixels": rng.integers(0, 256, (len(position), 4, 4, 3), dtype=np.uint8),
        "clip_score": rng.random(len(position)).astype(np.float32), "clip_agrees": rng.random(len(position)) > 0.5,
        "iqa_score": rng.random(len(position)).astype(np.float32),
        "clip_embedding": rng.standard_normal((len(position), DIM)).astype(np.float16),
    }
    return encode_images(batch, "png", 95)


def batches(rows: dict, order: np.ndarray, size: int) -> list[dict]:
    return [{k: v[order[i : i + size]] for k, v in rows.items()} for i in range(0, len(order), size)]


def write_all(output, parts: list[dict]) -> dict:
    with DatasetWriter.open(output, plan_of(), config={"seed": 0}, run={"device": "cpu"}) as writer:
        for part in parts:
            write_encoded(writer, part)
        return writer.finish(made=sum(len(p["label"]) for p in parts), seconds=1.0)


def shard_bytes(output) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((output / DATA_DIR).iterdir())}


def test_shards_do_not_depend_on_batching_or_arrival_order(tmp_path):
    rows = encoded_rows()
    in_order = write_all(tmp_path / "a", batches(rows, np.arange(12), 4))
    shuffled = write_all(tmp_path / "b", batches(rows, np.random.default_rng(1).permutation(12), 3))
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert in_order["shards"] == shuffled["shards"] and len(in_order["shards"]) == 3
    assert in_order["embedding_dim"] == DIM and in_order["totals"]["rows"] == 12
    assert dataset_complete(tmp_path / "a")
    table = pq.read_table(tmp_path / "a" / DATA_DIR / shard_name(1, 3))
    assert table.schema.remove_metadata().equals(ARROW_SCHEMA)
    assert table.column("index").to_pylist() == [1, 2, 3, 0, 1] and table.column("label").to_pylist() == [1, 1, 1, 2, 2]
    stored = np.array(table.column("clip_embedding").to_pylist(), dtype=np.float16)
    np.testing.assert_array_equal(stored, rows["clip_embedding"][5:10])


def test_a_reopened_dataset_keeps_its_whole_shards_and_makes_the_rest(tmp_path):
    rows = encoded_rows()
    write_all(tmp_path / "whole", batches(rows, np.arange(12), 12))
    writer = DatasetWriter.open(tmp_path / "cut", plan_of(), config={"seed": 0}, run={})
    write_encoded(writer, batches(rows, np.arange(7), 7)[0])  # shard 0 whole, shard 1 half: then the run dies ...
    assert len(list((tmp_path / "cut" / PARTS_DIR).iterdir())) == 1  # shard 1's part, waiting for the rest
    writer.lock.file.close()  # ... and the kernel drops its lock
    assert not dataset_complete(tmp_path / "cut")
    with DatasetWriter.open(tmp_path / "cut", plan_of(), config={"seed": 0}, run={}) as again:
        assert again.lock.stale["pid"] == os.getpid()  # the dead run's lock, taken over
        assert again.todo == [1, 2] and again.manifest["embedding_dim"] == DIM
        assert not (tmp_path / "cut" / PARTS_DIR).exists()  # the dead run's part: made again
        write_encoded(again, batches(rows, np.arange(5, 12), 7)[0])
        again.finish(made=7, seconds=1.0)
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "whole")


def test_other_content_or_a_foreign_directory_is_refused_untouched(tmp_path):
    write_all(tmp_path / "ds", batches(encoded_rows(), np.arange(12), 12))
    before = shard_bytes(tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"other settings \(seed: 0 -> 1\)"):
        DatasetWriter.open(tmp_path / "ds", plan_of({"seed": 1}), config={}, run={})
    assert shard_bytes(tmp_path / "ds") == before and read_manifest(tmp_path / "ds")["content"] == {"seed": 0}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not empty and holds no manifest.json"):
        DatasetWriter.open(tmp_path / "mine", plan_of(), config={}, run={})
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    with DatasetWriter.open(tmp_path / "ds", plan_of({"seed": 1}), config={}, run={}, overwrite=True) as replaced:
        assert replaced.todo == [0, 1, 2] and not list((tmp_path / "ds" / DATA_DIR).iterdir())
    assert (tmp_path / "ds" / MANIFEST).exists()


def test_an_open_writer_holds_its_output_and_a_refusal_leaves_no_lock_behind(tmp_path):
    from lbgen.errors import OutputInUseError
    from lbgen.runtime.locks import LOCK_FILE

    with DatasetWriter.open(tmp_path / "ds", plan_of(), config={}, run={}):
        with pytest.raises(OutputInUseError, match=r"ds is in use by .*one writer per output"):
            DatasetWriter.open(tmp_path / "ds", plan_of(), config={}, run={})
    DatasetWriter.open(tmp_path / "ds", plan_of(), config={}, run={}).close()  # released: open again
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError):
        DatasetWriter.open(tmp_path / "theirs", plan_of(), config={}, run={})
    assert not (tmp_path / "theirs" / LOCK_FILE).exists()


# ---------------------------------------------------------------- parts: written on the workers, assembled once


def test_a_part_reported_twice_is_counted_once_and_its_shard_assembled_once(tmp_path):
    """Ray re-runs a batch whose actor died after writing: the same part is written and reported again."""
    rows = encoded_rows()
    with DatasetWriter.open(tmp_path / "ds", plan_of(), config={}, run={}) as writer:
        meta = write_parts(batches(rows, np.arange(3), 3)[0], **writer.part_settings())
        assert writer.add_parts(meta) == []
        assert writer.add_parts(meta) == []  # shard 0 has 3 of its 5 rows, not 6
        rest = write_parts(batches(rows, np.arange(3, 5), 2)[0], **writer.part_settings())
        assert writer.add_parts(rest) == [(shard_name(0, 3), [f"{shard_name(0, 3)[:-8]}.{p:07d}.parquet" for p in (0, 3)])]


def test_assembly_run_again_after_a_crash_gives_the_same_entry(tmp_path):
    """A task killed after writing its shard, before deleting the parts, runs again: the shard is hashed, not rewritten."""
    rows = encoded_rows()
    with DatasetWriter.open(tmp_path / "ds", plan_of(), config={}, run={}) as writer:
        ((shard, parts),) = writer.add_parts(write_parts(batches(rows, np.arange(5), 5)[0], **writer.part_settings()))
        kept = [(tmp_path / "ds" / PARTS_DIR / p).read_bytes() for p in parts]
        first = assemble_shard(str(tmp_path / "ds"), shard, parts, 2)
        for part, data in zip(parts, kept):
            (tmp_path / "ds" / PARTS_DIR / part).write_bytes(data)  # as if the task died before deleting them
        written = (tmp_path / "ds" / DATA_DIR / shard).stat().st_mtime_ns
        assert assemble_shard(str(tmp_path / "ds"), shard, parts, 2) == first
        assert (tmp_path / "ds" / DATA_DIR / shard).stat().st_mtime_ns == written
        assert not list((tmp_path / "ds" / PARTS_DIR).iterdir())
    assert first["rows"] == 5


def test_a_worker_that_cannot_see_the_output_refuses_to_write_parts(tmp_path):
    """On a node without the shared mount, the output path is another, empty directory: no orphan parts there."""
    rows = encoded_rows()
    settings = {"output": str(tmp_path / "elsewhere"), "label_names": NAMES, "generator": "test", "num_shards": 3}
    with pytest.raises(DatasetError, match=r"elsewhere holds no manifest.json as seen from .*shared mount or an object-store URI"):
        write_parts(batches(rows, np.arange(2), 2)[0], **settings)
    assert not (tmp_path / "elsewhere").exists()
