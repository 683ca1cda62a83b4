"""lbgen.data.dataset: shard schema and HF features, atomic shard writes, card, manifest, inspection (no models)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lbgen.data.dataset import (
    COLUMNS,
    DatasetError,
    encode_images,
    features,
    inspect_dataset,
    label_names,
    read_manifest,
    schema,
    sha256_file,
    shard_name,
    write_card,
    write_shard,
)


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


def test_image_bytes_are_stored_plain_and_the_rest_compressed(tmp_path):
    final = tmp_path / shard_name(0, 1)
    write_shard(table_of(5), final, row_group_rows=5)
    group = pq.ParquetFile(final).metadata.row_group(0)
    chunks = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    image = chunks.pop("image.bytes")
    assert image.compression == "UNCOMPRESSED" and not image.has_dictionary_page
    assert {c.compression for c in chunks.values()} == {"SNAPPY"}
    assert chunks["class_name"].has_dictionary_page


def test_encode_png_is_lossless_and_names_files():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    out = encode_images({"pixels": pixels, "class_id": np.array(["n1", "n2"]), "index": np.array([3, 4])}, "png", 95)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(out["image_bytes"][1]))), pixels[1])
    assert list(out["image_path"]) == ["n1_00003.png", "n2_00004.png"]
    assert (out["height"][0], out["width"][0]) == (8, 6)


def test_card_declares_class_labels(tmp_path):
    import yaml

    write_card(tmp_path, ["cat", "dog"], "two classes")
    header = yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])
    label = next(f for f in header["dataset_info"]["features"] if f["name"] == "label")
    assert label["dtype"]["class_label"]["names"] == {"0": "cat", "1": "dog"}
    assert header["configs"][0]["data_files"][0]["path"] == "data/train-*"


def test_not_a_dataset(tmp_path):
    assert not inspect_dataset(tmp_path).ok
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json is not a readable lbgen manifest"):
        read_manifest(tmp_path)
