"""The one writer of a generated dataset: claim the output, resume, whole shards, manifest, card.

`generate` drives it: `with DatasetWriter.open(output, plan, ...) as writer:` -> `add(batch)` per
encoded batch -> `finish(...)`. While open it holds the output's lock (`lbgen.runtime.locks`; local
outputs: object stores have no lock primitive), so two runs never interleave one manifest. A shard exists under its final name only once it is whole (written to a hidden
temporary name, then renamed), and the manifest lists it only after that, so "the file exists"
is the completion marker that resume relies on. OUT is a local path or an object-store URI
(`s3://bucket/ds`): all I/O goes through `lbgen.data.storage`. The layout is `lbgen.data.format`'s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import yaml

from lbgen.data.format import (
    CARD,
    CONFIG,
    DATA_DIR,
    FORMAT,
    MANIFEST,
    card_text,
    schema,
    shard_metadata,
    shard_name,
    write_shard,
)
from lbgen.data.reader import read_manifest, read_stats, sha256_file, summarize
from lbgen.data.storage import Location, Where, locate
from lbgen.errors import DatasetError
from lbgen.runtime.locks import LOCK_FILE, OutputLock
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


class DatasetWriter:
    """Owns a dataset directory while a run writes it; `open` it, `add` encoded batches, `finish`."""

    def __init__(self, output: Location, plan: DatasetPlan, manifest: dict, lock: OutputLock | None):
        self.output, self.plan, self.manifest, self.lock = output, plan, manifest, lock
        self.schema = schema(plan.label_names)
        self.pending: dict[int, list[dict]] = {}  # shard -> its batches so far

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
    def open(cls, output: Where, plan: DatasetPlan, *, config: dict, run: dict, overwrite: bool = False) -> DatasetWriter:
        """Claim `output` for `plan`: new, or holding this very dataset (whose whole shards are kept).

        Refuses (DatasetError), touching nothing, when `output` holds anything else, unless
        `overwrite`. `config` (the resolved config) and `run` (how this run makes its images:
        device, precision) are recorded in the manifest.
        """
        output = locate(output)
        if output.exists() and not output.is_dir():
            raise DatasetError(f"output {output} exists and is not a directory")
        lock = OutputLock(output.path).acquire() if output.fs.type_name == "local" else None
        try:
            manifest = cls._claim(output, plan, config, run, overwrite)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(output, plan, manifest, lock)

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

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Take encoded rows (any shards, any order); each shard is written the moment it is whole."""
        shards = batch["shard"]
        for shard in np.unique(shards).tolist():
            parts = self.pending.setdefault(shard, [])
            parts.append({k: v[shards == shard] for k, v in batch.items()})
            if sum(len(p["label"]) for p in parts) == self.plan.shard_rows[shard]:
                self._write(shard, self.pending.pop(shard))

    def finish(self, made: int, seconds: float) -> dict:
        """Record totals, this run's throughput and the score summary; returns the final manifest."""
        manifest = self.manifest
        stats = read_stats([self.output / DATA_DIR / name for name in sorted(manifest["shards"])])
        manifest["totals"] = {"rows": stats.num_rows, "shards": len(manifest["shards"]),
                              "bytes": sum(e["bytes"] for e in manifest["shards"].values())}
        manifest["throughput"] = {"images_this_run": made, "seconds": round(seconds, 3),
                                  "images_per_s": round(made / seconds, 3) if made else None}
        manifest["summary"] = summarize(stats, self.plan.label_names)
        write_json_atomic(self.output / MANIFEST, manifest)
        return manifest

    def _table(self, parts: list[dict]) -> pa.Table:
        """One shard's rows, sorted by (label, index), as a table of the shard schema."""
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.lexsort((cols["index"], cols["label"]))
        cols = {k: v[order] for k, v in cols.items()}
        rows, (_, dim) = len(order), cols["clip_embedding"].shape
        arrays = {
            "image": pa.StructArray.from_arrays([pa.array(cols["image_bytes"].tolist(), pa.binary()),
                                                 pa.array(cols["image_path"].tolist(), pa.string())], names=["bytes", "path"]),
            "clip_embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32)),
                                                       pa.array(cols["clip_embedding"].astype(np.float16).reshape(-1))),
            "generator": pa.array([self.plan.generator] * rows, pa.string()),
        }
        for name in self.schema.names:
            if name not in arrays:
                arrays[name] = pa.array(cols[name].tolist(), self.schema.field(name).type)
        self.manifest["embedding_dim"] = dim
        return pa.Table.from_arrays([arrays[name] for name in self.schema.names], schema=self.schema)

    def _write(self, shard: int, parts: list[dict]) -> None:
        name = shard_name(shard, len(self.plan.shard_rows))
        try:
            entry = write_shard(self._table(parts), self.output / DATA_DIR / name, self.plan.row_group_rows)
            self.manifest["shards"][name] = entry
            # A shard is recorded only once whole; if this write fails, resume re-hashes the shard instead.
            write_json_atomic(self.output / MANIFEST, self.manifest)
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            raise _disk_full(self.output, name) from None


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
    ours = {tmp.name for tmp in leftovers} | {LOCK_FILE}
    if manifest is None and output.is_dir() and any(p.name not in ours for p in output.iterdir()):
        if not overwrite:
            raise DatasetError(f"{output} is not empty and holds no {MANIFEST}: refusing to write a dataset into it "
                               "(use an empty or new --output, or --overwrite)")
        _remove_dataset(output)
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
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
