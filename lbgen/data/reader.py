"""Reading a generated dataset back: manifest, finished shards, scores, stored CLIP embeddings, inspection.

`pretrain` reads the shards for training through `lbgen.data.shards` (any Parquet image shards);
this module reads what only an lbgen dataset has: its manifest and the per-row scores and
embeddings. `inspect_dataset` re-checks everything the writer guarantees and looks for
near-duplicate images within each class (the mode collapse of reward fine-tuning).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from lbgen.config import ReportConfig
from lbgen.data.format import (
    COLUMNS,
    DATA_DIR,
    FORMAT,
    MANIFEST,
    STAT_COLUMNS,
    read_columns,
    schema,
    shard_metadata,
    shard_name,
)
from lbgen.runtime.storage import Location, Where, locate
from lbgen.errors import DatasetError

# CLIP image-embedding cosine at or above which two images of a class count as near-duplicates.
NEAR_DUPLICATE_COSINE = ReportConfig.near_duplicate_cosine
# Near-duplicate pairs listed by `inspect`, the most similar first.
WORST_PAIRS = 5


def sha256_file(path: Where, chunk: int = 1 << 20) -> str:
    where = locate(path)
    digest = hashlib.sha256()
    with where.fs.open_input_stream(where.path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(output: Where) -> dict | None:
    """The manifest of `output`, or None if it has none; unreadable -> DatasetError."""
    path = locate(output) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path} is not a readable lbgen manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatasetError(f"{path} is not an lbgen dataset manifest (format {FORMAT!r})")
    return data


def finished_shards(output: Where, manifest: dict) -> list[Location]:
    """The shards the manifest lists as whole, in shard (hence label) order."""
    return [locate(output) / DATA_DIR / name for name in sorted(manifest.get("shards", {}))]


def dataset_complete(output: Where) -> bool:
    """Whether `output` holds a whole generated dataset: every shard written and the run finished."""
    manifest = read_manifest(output) if locate(output).is_dir() else None
    return manifest is not None and len(manifest.get("shards", {})) == manifest.get("num_shards", -1) and "totals" in manifest


def read_stats(paths: Sequence[Where]) -> pa.Table:
    """The STAT_COLUMNS of all shards (no image bytes), concatenated."""
    if not paths:
        return pa.table({c: pa.array([], COLUMNS[c][0]) for c in STAT_COLUMNS})
    return pa.concat_tables(read_columns(p, STAT_COLUMNS) for p in paths)


def class_embeddings(paths: Sequence[Where]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(label, indices (n,), unit CLIP embeddings (n, D) float32) per class, whatever order the shards hold.

    Every shard holds every class (`lbgen.data.plan`), so the rows are gathered by class through a
    memory-mapped file: one pass counts each class's rows, a second writes each row's embedding into its
    class's slot. Memory holds about one shard and one class, at any dataset size.
    """
    counts = _label_counts(paths)
    if not counts.sum():
        return
    starts = np.concatenate([[0], np.cumsum(counts)])
    with tempfile.TemporaryDirectory(prefix="lbgen-embeddings-") as tmp:
        indices, vectors, filled = np.empty(starts[-1], np.int64), None, starts[:-1].copy()
        for path in paths:
            table = read_columns(path, ["label", "index", "clip_embedding"])
            if not table.num_rows:
                continue
            labels, index, unit = _unit_rows(table)
            if vectors is None:
                vectors = np.memmap(Path(tmp) / "unit.f32", np.float32, "w+", shape=(starts[-1], unit.shape[1]))
            order = np.argsort(labels, kind="stable")
            sorted_labels = labels[order]
            first = np.searchsorted(sorted_labels, sorted_labels)  # where each row's label starts among them
            slots = filled[sorted_labels] + np.arange(len(order)) - first
            indices[slots], vectors[slots] = index[order], unit[order]
            filled += np.bincount(labels, minlength=len(counts))
        for label in np.flatnonzero(counts):
            rows = slice(starts[label], starts[label + 1])
            by_index = np.argsort(indices[rows], kind="stable")
            yield int(label), indices[rows][by_index], np.asarray(vectors[rows])[by_index]
        del vectors  # the map closes before its directory goes


def _label_counts(paths: Sequence[Where]) -> np.ndarray:
    """Rows of each label over `paths` (label column only)."""
    counts = np.zeros(0, np.int64)
    for path in paths:
        found = np.bincount(read_columns(path, ["label"]).column("label").to_numpy())
        counts = np.pad(counts, (0, max(0, len(found) - len(counts))))
        counts[:len(found)] += found
    return counts


def _unit_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, indices, unit-norm embeddings float32) of a shard's rows."""
    vectors = table.column("clip_embedding").combine_chunks()
    if vectors.null_count:
        raise DatasetError("shards hold rows without a CLIP embedding (made before lbgen stored them): re-generate")
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(table.num_rows, -1)
    unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    return table.column("label").to_numpy(), table.column("index").to_numpy(), unit


@dataclass
class ClassSimilarity:
    """How alike the images of one class are, from their stored CLIP embeddings."""

    label: int
    images: int
    diversity: float | None  # mean pairwise cosine distance (1 - cos); None below two images
    with_duplicate: int  # images that have a near-duplicate in their class
    pairs: list[tuple[float, int, int]]  # (cosine, index, index) of each near-duplicate pair


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean cosine distance (1 - cos) over the distinct pairs of rows of (n, d) `features`, n >= 2."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    n = len(unit)
    return float(max(0.0, 1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1))))


def class_similarity(paths: Sequence[Where], threshold: float = NEAR_DUPLICATE_COSINE) -> Iterator[ClassSimilarity]:
    """Per class: diversity and the near-duplicate pairs (cosine >= `threshold`) of its images."""
    for label, indices, unit in class_embeddings(paths):
        sims = unit @ unit.T  # (n, n)
        first, second = np.nonzero(np.triu(sims >= threshold, k=1))
        yield ClassSimilarity(
            label=label, images=len(indices),
            diversity=mean_pairwise_distance(unit) if len(indices) >= 2 else None,
            with_duplicate=np.union1d(first, second).size,
            pairs=[(round(float(sims[a, b]), 4), int(indices[a]), int(indices[b])) for a, b in zip(first, second)],
        )


def near_duplicates(paths: Sequence[Where], names: Sequence[str], threshold: float = NEAR_DUPLICATE_COSINE,
                    worst: int = WORST_PAIRS) -> dict:
    """Pairs of images of one class whose stored CLIP embeddings have cosine >= `threshold`.

    Returns the pair count, the share of images with a near-duplicate (overall and per class
    name), and the `worst` most similar pairs as (cosine, class name, index, index).
    """
    pairs, images, rows, per_class, top = 0, 0, 0, {}, []
    for found in class_similarity(paths, threshold):
        pairs, images, rows = pairs + len(found.pairs), images + found.with_duplicate, rows + found.images
        per_class[names[found.label]] = round(found.with_duplicate / found.images, 4)
        top = sorted(top + [(cos, names[found.label], a, b) for cos, a, b in found.pairs], reverse=True)[:worst]
    return {"threshold": threshold, "pairs": pairs, "image_share": round(images / rows, 4) if rows else None,
            "per_class": per_class, "worst": top}


def summarize(stats: pa.Table, names: Sequence[str]) -> dict:
    """Rows, mean scores, overall and per-class CLIP agreement of a stats table."""
    labels = stats.column("label").to_numpy()
    agrees = stats.column("clip_agrees").to_numpy(zero_copy_only=False).astype(float)
    count = np.bincount(labels, minlength=len(names))
    hits = np.bincount(labels, weights=agrees, minlength=len(names))
    per_class = {names[i]: round(float(hits[i] / count[i]), 4) for i in range(len(names)) if count[i]}
    mean = lambda col: round(float(stats.column(col).to_numpy().mean()), 4) if stats.num_rows else None
    return {
        "rows": stats.num_rows,
        "clip_score_mean": mean("clip_score"),
        "iqa_score_mean": mean("iqa_score"),
        "clip_agreement": round(float(agrees.mean()), 4) if stats.num_rows else None,
        "per_class_agreement": per_class,
    }


def format_summary(summary: dict, extra: dict | None = None, show_classes: int = 5) -> str:
    """A few terminal lines: totals, means, and the classes CLIP agrees with least and most."""
    lines = [" ".join(f"{k}={v}" for k, v in {**(extra or {}), **{k: v for k, v in summary.items() if k != "per_class_agreement"}}.items())]
    per_class = sorted(summary["per_class_agreement"].items(), key=lambda kv: kv[1])
    if per_class:
        fmt = lambda items: ", ".join(f"{n}: {a:.2f}" for n, a in items)
        if len(per_class) <= 2 * show_classes:
            lines.append("per-class CLIP agreement: " + fmt(per_class))
        else:
            lines.append("lowest CLIP agreement: " + fmt(per_class[:show_classes]))
            lines.append("highest CLIP agreement: " + fmt(per_class[-show_classes:]))
    return "\n".join(lines)


def format_near_duplicates(found: dict) -> str:
    """One line: how many near-duplicate pairs, the share of images in one, and the worst pairs."""
    worst = ", ".join(f"{name} #{a} ~ #{b} ({cos:.3f})" for cos, name, a, b in found["worst"])
    share = f"{found['image_share']:.1%}" if found["image_share"] is not None else "-"
    return (f"near-duplicates (CLIP cosine >= {found['threshold']}): {found['pairs']} pair(s) within classes, "
            f"{share} of images have one" + (f"; most similar: {worst}" if worst else ""))


@dataclass
class Inspection:
    """What `inspect_dataset` found: a summary, near-duplicates and a list of defects (empty = valid)."""

    summary: dict = field(default_factory=dict)
    near_duplicates: dict | None = None
    defects: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.defects


def _check_shard(path: Location, entry: dict | None, expected: pa.Schema, defects: list[str]) -> bool:
    """Checksum, schema and row count of one shard against its manifest entry; False if unusable."""
    if entry is None:
        defects.append(f"{path.name}: not listed in {MANIFEST}")
        return False
    if sha256_file(path) != entry["sha256"]:
        defects.append(f"{path.name}: sha256 differs from {MANIFEST} (file changed or corrupt)")
    try:
        rows, got = shard_metadata(path)
    except Exception as err:  # noqa: BLE001  pyarrow raises several types for a corrupt file
        defects.append(f"{path.name}: not readable Parquet ({err})")
        return False
    if not got.equals(expected.remove_metadata()):
        defects.append(f"{path.name}: schema differs from lbgen's ({got})")
        return False
    if rows != entry["rows"]:
        defects.append(f"{path.name}: {rows} rows, {MANIFEST} says {entry['rows']}")
    return True


def _check_rows(stats: pa.Table, num_classes: int, per_class: int, defects: list[str]) -> None:
    """Labels in range, every (label, index) once, `per_class` images per class."""
    labels = stats.column("label").to_numpy()
    index = stats.column("index").to_numpy()
    if stats.num_rows and (labels.min() < 0 or labels.max() >= num_classes):
        defects.append(f"labels outside 0..{num_classes - 1}")
        return
    keys = labels.astype(np.int64) * (int(index.max(initial=0)) + 1) + index
    dup = stats.num_rows - len(np.unique(keys))
    if dup:
        defects.append(f"{dup} duplicate (label, index) rows")
    counts = np.bincount(labels, minlength=num_classes)
    wrong = [(i, int(c)) for i, c in enumerate(counts) if c != per_class]
    if wrong:
        shown = ", ".join(f"label {i}: {c}" for i, c in wrong[:5])
        defects.append(f"{len(wrong)} class(es) without {per_class} images ({shown}{', ...' if len(wrong) > 5 else ''})")


def inspect_dataset(output: Where, near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE) -> Inspection:
    """Validate a generated dataset (manifest, shard set, checksums, schema, counts, duplicate rows)
    and find near-duplicate images within each class."""
    output = locate(output)
    found = Inspection()
    manifest = read_manifest(output) if output.is_dir() else None
    if manifest is None:
        found.defects.append(f"{output}: no {MANIFEST} (not an lbgen dataset)")
        return found
    names = manifest["label_names"]
    expected_files = {shard_name(k, manifest["num_shards"]) for k in range(manifest["num_shards"])}
    present = {p.name: p for p in (output / DATA_DIR).glob("train-*.parquet")}
    for name in sorted(expected_files - set(present)):
        found.defects.append(f"{name}: missing")
    for name in sorted(set(present) - expected_files):
        found.defects.append(f"{name}: unexpected shard")
    usable = [present[n] for n in sorted(expected_files & set(present))
              if _check_shard(present[n], manifest["shards"].get(n), schema(names), found.defects)]
    stats = read_stats(usable)
    _check_rows(stats, len(names), manifest["images_per_class"], found.defects)
    found.summary = {
        "shards": f"{len(present)}/{manifest['num_shards']}",
        "bytes": sum(p.size() for p in present.values()),
        "generator": manifest["generator"],
        **summarize(stats, names),
    }
    found.near_duplicates = near_duplicates(usable, names, near_duplicate_cosine)
    return found
