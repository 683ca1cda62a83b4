"""The Parquet image shards `pretrain` reads, lbgen's or others': discovery, schema checks, filters, split.

A shard has one row per image (the Hugging Face `datasets` Image convention for the image
column); an lbgen dataset directory contributes the shards its manifest lists as whole. Reading checks
every shard before training starts: an unreadable file, a missing or mistyped
column, or a label that disagrees with the class table is an error naming the
file (or, with `skip_bad_shards`, a warning and a count), never a wrong label.
A `--data` entry is a local path or an object-store URI (`lbgen.runtime.storage`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lbgen.data.classes import ClassTable
from lbgen.data.format import DATA_DIR
from lbgen.data.reader import finished_shards, read_manifest
from lbgen.runtime.storage import Location, locate
from lbgen.errors import ShardError  # noqa: F401  (raised here; defined with the others)
from lbgen.runtime.seeds import derive_seed

log = logging.getLogger(__name__)

# Ray Data's Parquet reader lists files by reading their footers on a pool of actors it starts for every
# read: 32 new worker processes by default, each epoch of each split. One actor reads 128 footers at
# once, so one per thousand or so shards is plenty; $RAY_DATA_PARQUET_FOOTER_NUM_ACTORS still wins.
FOOTER_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
SHARDS_PER_FOOTER_ACTOR = 1024

# Columns pretrain needs, with the type family each must have; score columns only when filtered on.
_KIND = {"integer": pa.types.is_integer, "floating": pa.types.is_floating, "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "boolean": pa.types.is_boolean}
REQUIRED = {"label": "integer", "class_id": "string", "index": "integer"}
SCORE_COLUMNS = {"clip_score": "floating", "iqa_score": "floating", "clip_agrees": "boolean"}


@dataclass(frozen=True)
class RowFilter:
    """Which rows of the shards a split uses: a seeded hash split plus optional score thresholds."""

    seed: int = 0
    val_fraction: float = 0.0
    min_clip_score: float | None = None
    min_iqa: float | None = None
    require_clip_agrees: bool = False

    def score_columns(self) -> list[str]:
        wanted = {"clip_score": self.min_clip_score is not None, "iqa_score": self.min_iqa is not None, "clip_agrees": self.require_clip_agrees}
        return [c for c, on in wanted.items() if on]

    def mask(self, table: pa.Table, split: str) -> np.ndarray:
        """(N,) bool: rows of `table` in `split` ("train" or "val") that pass the score thresholds.

        A row's split depends only on (seed, label, index), so it is the same whatever the
        shard layout, worker count or epoch.
        """
        labels = table.column("label").to_numpy(zero_copy_only=False)
        indices = table.column("index").to_numpy(zero_copy_only=False)
        buckets = np.fromiter((derive_seed(self.seed, "val", int(l), int(i)) % 1_000_000 for l, i in zip(labels, indices)), np.int64, len(labels))
        in_val = buckets < round(self.val_fraction * 1_000_000)
        keep = in_val if split == "val" else ~in_val
        if self.min_clip_score is not None:
            keep &= pc.fill_null(pc.greater_equal(table.column("clip_score"), self.min_clip_score), False).to_numpy(zero_copy_only=False)
        if self.min_iqa is not None:
            keep &= pc.fill_null(pc.greater_equal(table.column("iqa_score"), self.min_iqa), False).to_numpy(zero_copy_only=False)
        if self.require_clip_agrees:
            keep &= pc.fill_null(table.column("clip_agrees"), False).to_numpy(zero_copy_only=False)
        return keep

    def select(self, table: pa.Table, split: str) -> pa.Table:
        """The rows of `table` that `split` uses (see `mask`)."""
        return table.filter(pa.array(self.mask(table, split)))


@dataclass
class ShardSet:
    """The usable shards of a `--data` list, with row counts per split after filtering."""

    files: list[str]  # paths inside `filesystem` (what `ray.data.read_parquet` takes with it)
    bad: list[str] = field(default_factory=list)  # "path: reason" of each skipped shard
    rows: int = 0
    train_rows: int = 0
    val_rows: int = 0
    bytes: int = 0  # size of the usable files on disk
    filesystem: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem, repr=False, compare=False)

    def bytes_per_row(self) -> float:
        return self.bytes / max(self.rows, 1)

    def read(self, train: bool, block_rows: int, columns: list[str]):
        """The shards' `columns` as a Ray Dataset (file order shuffled per epoch for `train`), in blocks of
        about `block_rows` rows."""
        import ray.data

        with footer_readers(min(32, 1 + len(self.files) // SHARDS_PER_FOOTER_ACTOR)):
            ds = ray.data.read_parquet(self.files, filesystem=self.filesystem, columns=columns, include_paths=True,
                                       shuffle="files" if train else None)
        # This dataset's context only: Ray's defaults make one block per ~128 MiB, so a small shard would
        # decode in one task and stream nothing until done.
        block_bytes = max(1, int(block_rows * self.bytes_per_row()))
        ds.context.target_min_block_size = min(ds.context.target_min_block_size or block_bytes, block_bytes)
        ds.context.target_max_block_size = block_bytes
        return ds

    def to_json(self) -> dict:
        """Everything but the filesystem object, which is named by its type (`local`, `s3`, ...)."""
        fields = {k: v for k, v in asdict(self).items() if k != "filesystem"}
        return {**fields, "filesystem": self.filesystem.type_name}


@contextmanager
def footer_readers(actors: int) -> Iterator[None]:
    """Ray Data reads the footer pool's size from the environment when `read_parquet` plans the read."""
    if FOOTER_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ENV] = str(actors)
    try:
        yield
    finally:
        del os.environ[FOOTER_ENV]


def find_shards(data: Iterable[str]) -> list[Location]:
    """Parquet files of each entry: a file, an lbgen dataset's whole shards, `DIR/data/*.parquet`, or
    `DIR/*.parquet`; sorted per entry.

    All entries must be on one filesystem (Ray Data reads them with one).
    """
    files: list[Location] = []
    for entry in data:
        path = locate(entry)
        if files and not path.fs.equals(files[0].fs):
            raise ShardError(f"--data {entry}: on another filesystem than {files[0]}; give shards on one filesystem")
        if path.is_file():
            files.append(path)
            continue
        if not path.is_dir():
            raise ShardError(f"--data {entry}: no such file or directory")
        manifest = read_manifest(path)
        if manifest is not None:  # an lbgen dataset: the shards its manifest lists as whole
            found = finished_shards(path, manifest)
            folder = path / DATA_DIR
        else:
            folder = path / DATA_DIR if (path / DATA_DIR).is_dir() else path
            found = folder.glob("*.parquet")
        if not found:
            raise ShardError(f"--data {entry}: no .parquet shards in {folder}")
        files.extend(found)
    if not files:
        raise ShardError("no shards given (--data DIR...)")
    return files


def check_schema(path: str, schema: pa.Schema, row_filter: RowFilter) -> None:
    """Raise ShardError unless `schema` has the columns pretrain reads, with usable types."""
    wanted = dict(REQUIRED)
    wanted.update({c: SCORE_COLUMNS[c] for c in row_filter.score_columns()})
    if "image" not in schema.names:
        raise ShardError(f"{path}: no 'image' column (columns: {', '.join(schema.names)})")
    image = schema.field("image").type
    has_bytes = pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
    if not (has_bytes and (pa.types.is_binary(image.field("bytes").type) or pa.types.is_large_binary(image.field("bytes").type))):
        raise ShardError(f"{path}: column 'image' is {image}, expected struct<bytes: binary, path: string>")
    for name, kind in wanted.items():
        if name not in schema.names:
            raise ShardError(f"{path}: no {name!r} column (columns: {', '.join(schema.names)})")
        if not _KIND[kind](schema.field(name).type):
            raise ShardError(f"{path}: column {name!r} is {schema.field(name).type}, expected {kind}")


def check_labels(path: str, table: pa.Table, classes: ClassTable) -> None:
    """Raise ShardError unless every row's label is a row of `classes` whose id is the row's class_id."""
    if table.column("label").null_count or table.column("index").null_count:
        raise ShardError(f"{path}: null label or index")
    labels = table.column("label").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise ShardError(f"{path}: row {bad[0]}: label {labels[bad[0]]} outside the class table ({len(classes)} classes, {classes.source})")
    expected = np.asarray(classes.ids, dtype=object)[labels]
    ids = np.asarray(table.column("class_id").to_pylist(), dtype=object)
    bad = np.flatnonzero(expected != ids)
    if bad.size:
        r = bad[0]
        raise ShardError(f"{path}: row {r}: label {labels[r]} is {expected[r]!r} in the class table but the row says {ids[r]!r}")


def open_shards(data: Iterable[str], classes: ClassTable, row_filter: RowFilter, skip_bad: bool = False) -> ShardSet:
    """Check every shard of `data` (schema, labels against `classes`) and count rows per split.

    Reads only the small columns (labels, ids, scores), never the image bytes.
    """
    found = find_shards(data)
    out = ShardSet(files=[], filesystem=found[0].fs)
    columns = list(REQUIRED) + row_filter.score_columns()
    for location in found:
        path = str(location)
        try:
            try:
                with location.open_input() as source:
                    shard = pq.ParquetFile(source)
                    check_schema(path, shard.schema_arrow, row_filter)
                    table = shard.read(columns=columns)
                    size = source.size()
            except ShardError:
                raise
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise ShardError(f"{path}: not a readable Parquet shard ({type(err).__name__}: {err})") from None
            check_labels(path, table, classes)
        except ShardError as err:
            if not skip_bad:
                raise
            log.warning("skipping bad shard: %s", err)
            out.bad.append(str(err))
            continue
        out.files.append(location.path)
        out.bytes += size
        out.rows += table.num_rows
        out.train_rows += int(row_filter.mask(table, "train").sum())
        out.val_rows += int(row_filter.mask(table, "val").sum())
    if not out.files:
        raise ShardError(f"no usable shards ({len(out.bad)} bad): {out.bad[0] if out.bad else ''}")
    return out
