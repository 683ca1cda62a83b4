"""The writers of a generated dataset: parts and shards on the workers, the manifest on the driver.

Where the images are made, `write_parts` turns each encoded batch into one hidden part file per shard it
touches (`OUT/.parts/`), and hands the driver a row of metadata per part: the images never pass through the
driver. The driver's `DatasetWriter` claims the output, counts the parts of each shard, and, once a shard's
parts are all written, has `assemble_shard` (a task on a worker) read them, sort the rows and write the whole
shard; it then only commits: the shard's manifest entry. In a run: `with DatasetWriter.open(output, plan, ...)
as writer:` -> `add_parts(meta)` -> `assemble_shard(...)` per shard it returns -> `commit(...)` -> `finish(...)`.

While open it holds the output's lock (`lbgen.runtime.locks`), so two runs never interleave one manifest. A
shard exists under its final name only once it is whole (written to a hidden temporary name, then renamed),
and the manifest lists it only after that, so "the file exists" is the completion marker that resume relies
on; the parts of unfinished shards are dropped when a run claims the output. OUT is a local path (a shared
mount on a multi-node cluster) or an object-store URI (`s3://bucket/ds`): all I/O goes through
`lbgen.runtime.storage`. The layout is `lbgen.data.format`'s.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from lbgen.data.format import (
    CARD,
    CONFIG,
    DATA_DIR,
    FORMAT,
    MANIFEST,
    PARTS_DIR,
    card_text,
    read_shard,
    schema,
    shard_metadata,
    shard_name,
    write_shard,
)
from lbgen.data.reader import read_manifest, read_stats, sha256_file, summarize
from lbgen.runtime.storage import Location, Where, absolute, locate
from lbgen.errors import DatasetError
from lbgen.runtime.locks import LOCK_FILE, ObjectStoreLock, OutputLock, lock_output
from lbgen.runtime.outputs import differences

# No space left, or over quota: the run stops; whole shards stay and a re-run resumes.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class DatasetPlan:
    """What a run writes: the settings that define its rows and how they fall into shards."""

    content: dict  # every setting that defines a row's content; its hash guards resume
    label_names: list[str]  # ClassLabel names, in label order
    images_per_class: int
    shard_rows: list[int]  # rows of each shard, in shard order
    generator: str  # what made the images, recorded in every row
    description: str  # the dataset card's text
    row_group_rows: int


def content_hash(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def write_json_atomic(path: Where, data: dict) -> None:
    locate(path).write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


# ---------------------------------------------------------------- on the workers


def part_name(shard: str, first_position: int) -> str:
    """The part file of the rows of `shard` from `first_position` on. A batch's rows are planned once, so no two
    batches share a name, and a retried batch rewrites its own part with the same bytes."""
    return f"{shard.removesuffix('.parquet')}.{first_position:07d}.parquet"


def rows_table(cols: dict[str, np.ndarray], schema_: pa.Schema, generator: str) -> pa.Table:
    """Encoded rows (the encode stage's columns) as a table of the shard schema, in the order given."""
    rows, (_, dim) = len(cols["label"]), cols["clip_embedding"].shape
    arrays = {
        "image": pa.StructArray.from_arrays([pa.array(cols["image_bytes"].tolist(), pa.binary()),
                                             pa.array(cols["image_path"].tolist(), pa.string())], names=["bytes", "path"]),
        "clip_embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32)),
                                                   pa.array(cols["clip_embedding"].astype(np.float16).reshape(-1))),
        "generator": pa.array([generator] * rows, pa.string()),
    }
    for name in schema_.names:
        if name not in arrays:
            arrays[name] = pa.array(cols[name].tolist(), schema_.field(name).type)
    return pa.Table.from_arrays([arrays[name] for name in schema_.names], schema=schema_)


def write_parts(batch: dict[str, np.ndarray], *, output: str, label_names: list[str], generator: str,
                num_shards: int) -> dict[str, np.ndarray]:
    """Write encoded rows (any shards) as one part file per shard; returns the driver's metadata, a row per part:
    `shard`, `part` (its file name), `rows`, `embedding_dim`, and `error`: empty, or why the part was not written.

    A full disk is reported in `error`, not raised: Ray Data keeps only the text of an exception raised here, and
    the driver is the one to stop the run with its one-line message (`DatasetWriter.add_parts`).
    `output` is the run's output as a worker must reach it: a shared mount or an object-store URI. A node that
    does not see the run's manifest there would write parts nobody assembles, so it refuses instead.
    """
    out = locate(output)
    if not (out / MANIFEST).exists():
        raise DatasetError(f"{output} holds no {MANIFEST} as seen from {socket.gethostname()}: on a multi-node "
                           "cluster, generate.output must be a shared mount or an object-store URI")
    schema_, meta = schema(label_names), {"shard": [], "part": [], "rows": [], "embedding_dim": [], "error": []}
    for shard in np.unique(batch["shard"]).tolist():
        cols = {k: v[batch["shard"] == shard] for k, v in batch.items()}
        name = shard_name(shard, num_shards)
        part, error = part_name(name, int(cols["position"].min())), ""
        try:
            with _stop_when_full(out, name):
                write_shard(rows_table(cols, schema_, generator), out / PARTS_DIR / part, row_group_rows=len(cols["label"]))
        except DatasetError as err:
            error = str(err)
        for key, value in zip(meta, (shard, part, len(cols["label"]), cols["clip_embedding"].shape[1], error)):
            meta[key].append(value)
    return {key: np.asarray(values) for key, values in meta.items()}


def assemble_shard(output: str, shard: str, parts: list[str], row_group_rows: int) -> dict:
    """Write `shard` of `output` whole from its `parts` (rows sorted by label, then index), then delete the parts;
    returns its manifest entry (rows, bytes, sha256).

    Safe to run again after a crash at any point: a shard already written whole is only hashed again.
    """
    out = locate(output)
    final = out / DATA_DIR / shard
    if final.exists():
        entry = {"rows": shard_metadata(final)[0], "bytes": final.size(), "sha256": sha256_file(final)}
    else:
        table = pa.concat_tables([read_shard(out / PARTS_DIR / part) for part in parts])
        with _stop_when_full(out, shard):
            entry = write_shard(table.sort_by([("label", "ascending"), ("index", "ascending")]), final, row_group_rows)
    for part in parts:
        (out / PARTS_DIR / part).unlink(missing_ok=True)
    return entry


@contextlib.contextmanager
def _stop_when_full(output: Location, shard: str):
    """A full disk while writing `shard` (or a part of it) becomes the one-line error that says how to resume."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise _disk_full(output, shard) from None


# ---------------------------------------------------------------- on the driver


class DatasetWriter:
    """Owns a dataset directory while a run writes it: `open` it, `add_parts`, `commit` whole shards, `finish`."""

    def __init__(self, output: Location, plan: DatasetPlan, manifest: dict, lock: OutputLock | ObjectStoreLock | None,
                 where: str):
        self.output, self.plan, self.manifest, self.lock = output, plan, manifest, lock
        self.where = where  # the output as workers reach it: an absolute path, or the URI with its query
        self.parts: dict[int, dict[str, int]] = {}  # shard -> its parts written so far -> their rows

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the output (whole shards stay; a re-run resumes from them)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @classmethod
    def open(cls, output: str | Path, plan: DatasetPlan, *, config: dict, run: dict, overwrite: bool = False) -> DatasetWriter:
        """Claim `output` for `plan`: new, or holding this very dataset (whose whole shards are kept).

        Refuses (DatasetError), touching nothing, when `output` holds anything else, unless
        `overwrite`. `config` (the resolved config) and `run` (how this run makes its images:
        device, precision) are recorded in the manifest.
        """
        where, output = absolute(output), locate(output)
        if output.exists() and not output.is_dir():
            raise DatasetError(f"output {output} exists and is not a directory")
        lock = lock_output(output)
        try:
            manifest = cls._claim(output, plan, config, run, overwrite)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(output, plan, manifest, lock, where)

    @staticmethod
    def _claim(output: Location, plan: DatasetPlan, config: dict, run: dict, overwrite: bool) -> dict:
        """Check and take `output` for `plan` (see `open`); returns the manifest now on disk."""
        prior = claim_output(output, plan.content, overwrite)
        shards = _finished_shards(output, prior, plan.shard_rows) if prior else {}
        manifest = {
            "format": FORMAT, "content_hash": content_hash(plan.content), "content": plan.content, "config": config,
            "generator": plan.generator, "num_classes": len(plan.label_names), "images_per_class": plan.images_per_class,
            "label_names": plan.label_names, "num_shards": len(plan.shard_rows), "shards": shards,
            "embedding_dim": (prior or {}).get("embedding_dim"), **run,
        }
        output.mkdir()
        write_json_atomic(output / MANIFEST, manifest)  # first: it claims the directory for this dataset
        (output / DATA_DIR).mkdir()  # after: a run killed in between leaves no unclaimed directory
        (output / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        (output / CARD).write_text(card_text(plan.label_names, plan.description))
        return manifest

    @property
    def todo(self) -> list[int]:
        """The shards still to make."""
        n = len(self.plan.shard_rows)
        return [k for k in range(n) if shard_name(k, n) not in self.manifest["shards"]]

    def part_settings(self) -> dict:
        """`write_parts`' keyword arguments for this dataset."""
        return {"output": self.where, "label_names": self.plan.label_names, "generator": self.plan.generator,
                "num_shards": len(self.plan.shard_rows)}

    def add_parts(self, meta: dict[str, np.ndarray]) -> list[tuple[str, list[str]]]:
        """Count parts that `write_parts` wrote (its metadata rows, in any order); returns (shard name, its parts)
        for each shard whose parts are now all written, for `assemble_shard`."""
        whole, n = [], len(self.plan.shard_rows)
        for shard, part, rows, dim, error in zip(*(meta[key].tolist() for key in ("shard", "part", "rows", "embedding_dim", "error"))):
            if error:
                raise DatasetError(error)
            self.manifest["embedding_dim"] = dim
            parts = self.parts.setdefault(shard, {})
            parts[part] = rows  # a batch that Ray ran twice reports the same part twice: counted once
            if sum(parts.values()) == self.plan.shard_rows[shard]:
                whole.append((shard_name(shard, n), sorted(self.parts.pop(shard))))
        return whole

    def commit(self, shard: str, entry: dict) -> None:
        """Record the whole shard `shard` (`assemble_shard`'s entry) in the manifest: from now on resume keeps it."""
        self.manifest["shards"][shard] = entry
        with _stop_when_full(self.output, shard):
            write_json_atomic(self.output / MANIFEST, self.manifest)

    def finish(self, made: int, seconds: float) -> dict:
        """Record totals, this run's throughput and the score summary; returns the final manifest."""
        manifest = self.manifest
        (self.output / PARTS_DIR).delete_tree()  # empty by now: every part went into its shard
        stats = read_stats([self.output / DATA_DIR / name for name in sorted(manifest["shards"])])
        manifest["totals"] = {"rows": stats.num_rows, "shards": len(manifest["shards"]),
                              "bytes": sum(e["bytes"] for e in manifest["shards"].values())}
        manifest["throughput"] = {"images_this_run": made, "seconds": round(seconds, 3),
                                  "images_per_s": round(made / seconds, 3) if made else None}
        manifest["summary"] = summarize(stats, self.plan.label_names)
        write_json_atomic(self.output / MANIFEST, manifest)
        return manifest


def _disk_full(output: Location, shard: str) -> DatasetError:
    """The one-line error of a run that ran out of space writing `shard`: what is kept, how to resume."""
    kept = len((output / DATA_DIR).glob("train-*.parquet"))
    free = f" ({shutil.disk_usage(output.path).free / 2**20:.1f} MiB free)" if output.fs.type_name == "local" else ""
    return DatasetError(f"no space left on device writing {shard} into {output}{free}: "
                        f"the {kept} complete shard(s) there are kept; free space and re-run the same command to resume")


def _remove_dataset(output: Location) -> None:
    """Delete what a generate run writes (shards, temp shards, manifest, card, config) and nothing else."""
    for path in (output / DATA_DIR).glob("*train-*.parquet*"):
        path.unlink()
    (output / PARTS_DIR).delete_tree()
    for name in (MANIFEST, CARD, CONFIG):
        (output / name).unlink(missing_ok=True)


def _interrupted_writes(output: Location) -> list[Location]:
    """Temp files (shards, manifest) left by a killed run; never visible under a final name."""
    return [*output.glob(f".{MANIFEST}.tmp-*"), *(output / DATA_DIR).glob(".train-*.tmp-*")]


def claim_output(output: Location, content: dict, overwrite: bool) -> dict | None:
    """Check that `output` is empty or holds this very dataset; returns its manifest (None if new).

    Refuses (DatasetError), touching nothing, when it holds other content, unless `overwrite`.
    """
    manifest = read_manifest(output) if output.is_dir() else None
    if manifest is not None and manifest["content_hash"] != content_hash(content):
        if not overwrite:
            detail = "; ".join(differences(manifest["content"], content)[:6])
            raise DatasetError(f"{output} holds a dataset made with other settings ({detail}); "
                               "use another --output, or --overwrite to replace it")
        _remove_dataset(output)
        return None
    leftovers = _interrupted_writes(output) if output.is_dir() else []
    ours = {tmp.name for tmp in leftovers} | {LOCK_FILE, PARTS_DIR}
    if manifest is None and output.is_dir() and any(p.name not in ours for p in output.iterdir()):
        if not overwrite:
            raise DatasetError(f"{output} is not empty and holds no {MANIFEST}: refusing to write a dataset into it "
                               "(use an empty or new --output, or --overwrite)")
        _remove_dataset(output)
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    if manifest is not None:
        (output / PARTS_DIR).delete_tree()  # parts of shards a killed run left unfinished: made again
    return manifest


def _finished_shards(output: Location, manifest: dict, shard_rows: list[int]) -> dict[str, dict]:
    """Manifest entries of the shards already whole on disk (a shard renamed just before a crash is re-hashed)."""
    done = {}
    for k, rows in enumerate(shard_rows):
        name = shard_name(k, len(shard_rows))
        path = output / DATA_DIR / name
        if not path.exists():
            continue
        entry = manifest["shards"].get(name)
        if entry is None and shard_metadata(path)[0] == rows:
            entry = {"rows": rows, "bytes": path.size(), "sha256": sha256_file(path)}
        if entry is not None:
            done[name] = entry
    return done
