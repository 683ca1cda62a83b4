"""The on-disk format of a generated dataset: layout, shard schema, Hugging Face features, card.

    OUT/data/train-00000-of-00012.parquet   shards (the Hugging Face `datasets` Parquet convention)
    OUT/manifest.json                       settings, their hash, finished shards (rows, sha256)
    OUT/config.yaml                         the resolved config of the run
    OUT/README.md                           dataset card declaring the features (Image, ClassLabel, ...)
    OUT/.parts/train-00000-of-00012.0000064.parquet   while running: a batch's rows of a shard (hidden)

`lbgen.data.writer` writes this layout and `lbgen.data.reader` reads it; both take it from here,
and only the shard functions at the end touch Parquet. Another shard format (WebDataset tar
files, say) is another module with `shard_name`, `write_shard`, `read_shard`, `read_columns` and `shard_metadata`,
chosen by a `format` name in the manifest; the writer, the reader and their guarantees stay as they are.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from lbgen.runtime.storage import Where, locate

MANIFEST = "manifest.json"
CARD = "README.md"
CONFIG = "config.yaml"
DATA_DIR = "data"
PARTS_DIR = ".parts"  # hidden: `datasets`, pyarrow and Ray Data skip dot-names when they list a dataset
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
    # The CLIP image embedding the scores came from (its length is the manifest's `embedding_dim`):
    # diversity and near-duplicates are measured from it without re-embedding.
    "clip_embedding": (pa.list_(pa.float16()), {"feature": {"dtype": "float16", "_type": "Value"}, "_type": "List"}),
    "generator": (pa.string(), {"dtype": "string", "_type": "Value"}),
}

# The Arrow schema of a shard's columns (`schema` adds the HF features as metadata).
ARROW_SCHEMA = pa.schema([(name, kind) for name, (kind, _) in COLUMNS.items()])

# Encoded images and embeddings are unique, and images are already compressed: a dictionary page
# and snappy would only cost CPU on every write and read (benchmarks/RESULTS.md), so they are stored plain.
_LEAF_COLUMNS = ARROW_SCHEMA.empty_table().flatten().column_names
_UNIQUE_COLUMNS = {"image.bytes", "clip_embedding"}
PARQUET_OPTIONS = {
    "use_dictionary": [c for c in _LEAF_COLUMNS if c not in _UNIQUE_COLUMNS],
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


def _card_feature(column: str, feature: dict, names: Sequence[str]) -> dict:
    """One entry of the card's `dataset_info.features` (the Hub's YAML spelling of a feature)."""
    kind = feature["_type"]
    if kind == "Image":
        return {"name": column, "dtype": "image"}
    if kind == "ClassLabel":
        return {"name": column, "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}}
    if kind == "List":
        return {"name": column, "list": feature["feature"]["dtype"]}
    return {"name": column, "dtype": feature["dtype"]}


def card_text(names: Sequence[str], description: str) -> str:
    """README.md whose YAML header lets `datasets.load_dataset(OUT)` find the shards and features."""
    header = {
        "dataset_info": {"features": [_card_feature(c, f, names) for c, f in features(names).items()]},
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/train-*"}]}],
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n" + description + "\n"


# ---------------------------------------------------------------- shard files


def write_shard(table: pa.Table, final: Where, row_group_rows: int) -> dict:
    """Write `table` as the shard `final`, atomically (`Location.write_bytes`): no partial file under `final`.

    Serialised in memory first: the checksum comes from the bytes written, with no read-back
    (a shard is a few hundred MB at most). Returns the shard's manifest entry (rows, bytes, sha256).
    """
    final = locate(final)
    final.parent.mkdir()
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=row_group_rows, **PARQUET_OPTIONS)
    data = buffer.getvalue()
    final.write_bytes(data)
    return {"rows": table.num_rows, "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}


def read_columns(path: Where, columns: list[str]) -> pa.Table:
    """`columns` of one shard (never more: the image bytes are read only when asked for)."""
    path = locate(path)
    return pq.read_table(path.path, filesystem=path.fs, columns=columns)


def read_shard(path: Where) -> pa.Table:
    """A whole shard (or part file), schema metadata included."""
    path = locate(path)
    return pq.read_table(path.path, filesystem=path.fs)


def shard_metadata(path: Where) -> tuple[int, pa.Schema]:
    """(rows, Arrow schema without metadata) of one shard, from its footer alone."""
    with locate(path).open_input() as source:
        meta = pq.read_metadata(source)
    return meta.num_rows, meta.schema.to_arrow_schema().remove_metadata()
