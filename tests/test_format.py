"""lbgen.data.format: shard schema, HF features, shard names, dataset card, atomic shard files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lbgen.data.format import COLUMNS, card_text, features, label_names, schema, shard_name, write_shard
from lbgen.data.reader import sha256_file


def test_label_names_are_unique_and_keep_row_order():
    assert label_names(["a", "b", "c"], ["missile", "tank", "missile"]) == ["missile (a)", "tank", "missile (c)"]


def test_features_match_datasets_conventions():
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features.from_dict(features(["cat", "dog"]))
    assert isinstance(feats["image"], datasets.Image) and feats["label"].names == ["cat", "dog"]
    assert feats.arrow_schema.remove_metadata().equals(schema(["cat", "dog"]).remove_metadata())


def test_shard_names_are_zero_padded_and_sort():
    names = [shard_name(k, 120) for k in (0, 9, 10, 119)]
    assert names[0] == "train-00000-of-00120.parquet" and names == sorted(names)


def test_card_declares_class_labels():
    import yaml

    header = yaml.safe_load(card_text(["cat", "dog"], "two classes").split("---")[1])
    label = next(f for f in header["dataset_info"]["features"] if f["name"] == "label")
    assert label["dtype"]["class_label"]["names"] == {"0": "cat", "1": "dog"}
    assert header["configs"][0]["data_files"][0]["path"] == "data/train-*"
    embedding = next(f for f in header["dataset_info"]["features"] if f["name"] == "clip_embedding")
    assert embedding == {"name": "clip_embedding", "list": "float16"}


def table_of(rows: int) -> pa.Table:
    values = {"image": [{"bytes": b"x", "path": "p.png"}] * rows, "label": [0] * rows, "clip_agrees": [True] * rows}
    for col, (tp, _) in COLUMNS.items():
        values.setdefault(col, pa.array([None] * rows, tp).to_pylist() if tp != pa.string() else ["s"] * rows)
    return pa.Table.from_pydict(values, schema=schema(["only"]))


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    final = tmp_path / "data" / shard_name(0, 1)
    entry = write_shard(table_of(5), final, row_group_rows=2)
    assert entry["rows"] == 5 and entry["sha256"] == sha256_file(final)
    assert pq.ParquetFile(final).metadata.num_row_groups == 3

    def broken(table, where, **kwargs):  # dies half-way through serialising
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    other = tmp_path / "data" / shard_name(1, 2)
    with pytest.raises(OSError, match="disk full"):
        write_shard(table_of(5), other, row_group_rows=2)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [final.name]  # no partial, no temp file


def test_image_bytes_and_embeddings_are_stored_plain_and_the_rest_compressed(tmp_path):
    final = tmp_path / shard_name(0, 1)
    write_shard(table_of(5), final, row_group_rows=5)
    group = pq.ParquetFile(final).metadata.row_group(0)
    chunks = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    image = chunks.pop("image.bytes")
    assert image.compression == "UNCOMPRESSED" and not image.has_dictionary_page
    assert not chunks.pop("clip_embedding.list.element").has_dictionary_page
    assert {c.compression for c in chunks.values()} == {"SNAPPY"}
    assert chunks["class_name"].has_dictionary_page
