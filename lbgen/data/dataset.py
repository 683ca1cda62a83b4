"""The generated dataset on disk: shard schema, atomic shard writes, manifest, card, inspection.

Layout of a dataset directory (the Hugging Face `datasets` Parquet convention):

    OUT/data/train-00000-of-00012.parquet   shards, written to a hidden temp name then renamed
    OUT/manifest.json                       settings, their hash, finished shards (rows, sha256)
    OUT/README.md                           dataset card declaring the features (Image, ClassLabel)

A shard exists under its final name only once it is whole, so "the file exists" is the
completion marker that resume relies on. `inspect_dataset` re-checks all of it.
OUT is a local path or an object-store URI (`s3://bucket/ds`): all I/O goes through `lbgen.data.storage`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from lbgen.data.storage import Location, Where, locate
from lbgen.errors import DatasetError  # noqa: F401  (raised here; defined with the others)

MANIFEST = "manifest.json"
CARD = "README.md"
DATA_DIR = "data"
FORMAT = "lbgen-dataset/1"

# Column -> (arrow type, HF `datasets` feature). `image` follows datasets' Image convention.
COLUMNS: dict[str, tuple[pa.DataType, dict]] = {
    "image": (pa.struct([("bytes", pa.binary()), ("path", pa.string())]), {"_type": "Image"}),
    "label": (pa.int64(), {}),  # ClassLabel, filled with the table's names in `features`
    "class_id": (pa.string(), {"dtype": "string", "_type": "Value"}),
    "class_name": (pa.string(), {"dtype": "string", "_type": "Value"}),
    "prompt": (pa.string(), {"dtype": "string", "_type": "Value"}),
    "seed": (pa.int64(), {"dtype": "int64", "_type": "Value"}),
    "index": (pa.int64(), {"dtype": "int64", "_type": "Value"}),
    "width": (pa.int32(), {"dtype": "int32", "_type": "Value"}),
    "height": (pa.int32(), {"dtype": "int32", "_type": "Value"}),
    "clip_score": (pa.float32(), {"dtype": "float32", "_type": "Value"}),
    "clip_agrees": (pa.bool_(), {"dtype": "bool", "_type": "Value"}),
    "iqa_score": (pa.float32(), {"dtype": "float32", "_type": "Value"}),
    "generator": (pa.string(), {"dtype": "string", "_type": "Value"}),
}

# image_format -> (PIL format, file extension)
PIL_FORMATS = {"jpeg": ("JPEG", "jpg"), "png": ("PNG", "png"), "webp": ("WEBP", "webp")}

# The Arrow schema of a shard's columns (`schema` adds the HF features as metadata).
ARROW_SCHEMA = pa.schema([(name, kind) for name, (kind, _) in COLUMNS.items()])

# The encoded images are unique and already compressed: a dictionary page and snappy would only
# cost CPU on every write and every read (benchmarks/RESULTS.md), so that column is stored plain.
_LEAF_COLUMNS = ARROW_SCHEMA.empty_table().flatten().column_names
PARQUET_OPTIONS = {
    "use_dictionary": [c for c in _LEAF_COLUMNS if c != "image.bytes"],
    "compression": {c: "none" if c == "image.bytes" else "snappy" for c in _LEAF_COLUMNS},
}

# Columns the summary and inspection read (never the image bytes).
STAT_COLUMNS = ["label", "index", "clip_score", "clip_agrees", "iqa_score"]


def label_names(ids: Sequence[str], names: Sequence[str]) -> list[str]:
    """Unique ClassLabel names in label order: a repeated name (ImageNet's two "missile") gets its class id."""
    counts = Counter(names)
    return [name if counts[name] == 1 else f"{name} ({cid})" for cid, name in zip(ids, names)]


def features(names: Sequence[str]) -> dict:
    """The `datasets.Features` dict of a shard (as `Features.to_dict()` writes it)."""
    out = {col: dict(feat) for col, (_, feat) in COLUMNS.items()}
    out["label"] = {"names": list(names), "_type": "ClassLabel"}
    return out


def schema(names: Sequence[str]) -> pa.Schema:
    """Arrow schema of a shard; its metadata carries the HF features so plain Parquet loads decode images."""
    meta = {b"huggingface": json.dumps({"info": {"features": features(names)}}).encode()}
    return ARROW_SCHEMA.with_metadata(meta)


def shard_name(shard: int, num_shards: int) -> str:
    return f"train-{shard:05d}-of-{num_shards:05d}.parquet"


def encode_images(batch: dict, image_format: str, quality: int) -> dict:
    """`pixels` -> encoded `image_bytes` and a file name `image_path` (then drops `pixels`)."""
    import numpy as np
    from PIL import Image

    pil_format, ext = PIL_FORMATS[image_format]
    options = {} if pil_format == "PNG" else {"quality": quality}
    blobs, paths = [], []
    for pixels, class_id, index in zip(batch["pixels"], batch["class_id"], batch["index"]):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=pil_format, **options)
        blobs.append(buffer.getvalue())
        paths.append(f"{class_id}_{int(index):05d}.{ext}")
    out = {k: v for k, v in batch.items() if k != "pixels"}
    shape = batch["pixels"].shape  # (B, H, W, 3)
    out.update(image_bytes=np.array(blobs, dtype=object), image_path=np.array(paths, dtype=object),
               height=np.full(shape[0], shape[1], np.int32), width=np.full(shape[0], shape[2], np.int32))
    return out


def sha256_file(path: Where, chunk: int = 1 << 20) -> str:
    where = locate(path)
    digest = hashlib.sha256()
    with where.fs.open_input_stream(where.path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_shard(table: pa.Table, final: Where, row_group_rows: int) -> dict:
    """Write `table` as the shard `final`, atomically (`Location.write_bytes`): no partial file under `final`.

    Serialised in memory first: the checksum comes from the bytes written, with no read-back
    (a shard is a few hundred MB at most, and the driver holds its table anyway).
    Returns the shard's manifest entry (rows, bytes, sha256).
    """
    final = locate(final)
    final.parent.mkdir()
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=row_group_rows, **PARQUET_OPTIONS)
    data = buffer.getvalue()
    final.write_bytes(data)
    return {"rows": table.num_rows, "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}


def write_json_atomic(path: Where, data: dict) -> None:
    locate(path).write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


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


def write_card(output: Where, names: Sequence[str], description: str) -> None:
    """README.md whose YAML header lets `datasets.load_dataset(OUT)` find the shards and features."""
    feats = []
    for col, value in features(names).items():
        if value["_type"] == "Image":
            feats.append({"name": col, "dtype": "image"})
        elif value["_type"] == "ClassLabel":
            feats.append({"name": col, "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}})
        else:
            feats.append({"name": col, "dtype": value["dtype"]})
    header = {
        "dataset_info": {"features": feats},
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/train-*"}]}],
    }
    text = "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n" + description + "\n"
    (locate(output) / CARD).write_text(text)


# ---------------------------------------------------------------- reading back


def read_stats(paths: Sequence[Where]) -> pa.Table:
    """The STAT_COLUMNS of all shards (no image bytes), concatenated."""
    if not paths:
        return pa.table({c: pa.array([], COLUMNS[c][0]) for c in STAT_COLUMNS})
    shards = [locate(p) for p in paths]
    return pa.concat_tables(pq.read_table(p.path, filesystem=p.fs, columns=STAT_COLUMNS) for p in shards)


def summarize(stats: pa.Table, names: Sequence[str]) -> dict:
    """Rows, mean scores, overall and per-class CLIP agreement of a stats table."""
    import numpy as np

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


@dataclass
class Inspection:
    """What `inspect_dataset` found: a summary and a list of defects (empty = valid)."""

    summary: dict = field(default_factory=dict)
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
        with path.open_input() as source:
            meta = pq.read_metadata(source)
            got = meta.schema.to_arrow_schema()
    except Exception as err:  # noqa: BLE001  pyarrow raises several types for a corrupt file
        defects.append(f"{path.name}: not readable Parquet ({err})")
        return False
    if not got.remove_metadata().equals(expected.remove_metadata()):
        defects.append(f"{path.name}: schema differs from lbgen's ({got.remove_metadata()})")
        return False
    if meta.num_rows != entry["rows"]:
        defects.append(f"{path.name}: {meta.num_rows} rows, {MANIFEST} says {entry['rows']}")
    return True


def _check_rows(stats: pa.Table, num_classes: int, per_class: int, defects: list[str]) -> None:
    """Labels in range, every (label, index) once, `per_class` images per class."""
    import numpy as np

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


def inspect_dataset(output: Where) -> Inspection:
    """Validate a generated dataset (manifest, shard set, checksums, schema, counts, duplicates)."""
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
    return found
