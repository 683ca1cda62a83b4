"""lbgen.data.reader: manifest reading, stored CLIP embeddings per class, near-duplicates, inspection."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from rows import write_encoded

from lbgen.config import resolve
from lbgen.data.downstream import render_shape
from lbgen.data.format import DATA_DIR, read_columns
from lbgen.data.images import encode_images
from lbgen.data.reader import (
    class_embeddings,
    finished_shards,
    inspect_dataset,
    mean_pairwise_distance,
    near_duplicates,
    read_manifest,
)
from lbgen.data.plan import row_order
from lbgen.data.writer import DatasetPlan, DatasetWriter
from lbgen.errors import DatasetError

NAMES = [f"shape {k}" for k in range(4)]
PER_CLASS, ROWS_PER_SHARD = 6, 5
# (label, index) of an image and the (label, index) whose pixels are planted over it.
PLANTED = {(0, 4): (0, 1), (2, 5): (2, 0), (3, 3): (3, 2)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 4-class dataset of rendered shapes, scored by generate's own ScoreBatch (tiny CLIP), with
    three images overwritten by copies of another image of their class; its rows in generation's order,
    a seeded permutation (every shard mixes classes)."""
    from lbgen.stages.generate import ScoreBatch

    cfg = resolve("tiny")
    image = np.arange(len(NAMES) * PER_CLASS)  # label * PER_CLASS + index
    pixels = np.stack([np.asarray(render_shape(int(p) // PER_CLASS, np.random.default_rng(int(p)), 64)) for p in image])
    for (lb, i), (src_lb, src_i) in PLANTED.items():
        pixels[lb * PER_CLASS + i] = pixels[src_lb * PER_CLASS + src_i]
    order = row_order(len(image), 0)
    position, pixels = np.arange(len(image)), pixels[order]
    label, index = order // PER_CLASS, order % PER_CLASS
    batch = {"label": label, "index": index, "shard": position // ROWS_PER_SHARD, "position": position % ROWS_PER_SHARD, "seed": order,
             "class_id": np.array([f"s{k}" for k in label], dtype=object), "class_name": np.array([NAMES[k] for k in label], dtype=object),
             "prompt": np.array([NAMES[k] for k in label], dtype=object), "pixels": pixels}
    scored = ScoreBatch(dataclasses.asdict(cfg))(batch)
    rows = [min(ROWS_PER_SHARD, len(position) - s) for s in range(0, len(position), ROWS_PER_SHARD)]
    plan = DatasetPlan(content={}, label_names=NAMES, images_per_class=PER_CLASS, shard_rows=rows, generator="shapes",
                       description="planted", row_group_rows=4)
    output = tmp_path_factory.mktemp("planted")
    with DatasetWriter.open(output, plan, config={}, run={}) as writer:
        write_encoded(writer, encode_images(scored, "png", 95))
        writer.finish(made=len(position), seconds=1.0)
    return output


def test_embeddings_come_back_per_class_across_shard_boundaries(planted):
    shards = finished_shards(planted, read_manifest(planted))
    assert len(shards) == 5  # 24 images, 5 rows per shard, each shard a mix of classes
    assert all(len(set(read_columns(path, ["label"]).column("label").to_pylist())) >= 2 for path in shards)
    got = list(class_embeddings(shards))
    assert [label for label, _, _ in got] == [0, 1, 2, 3]
    for _, indices, unit in got:
        assert sorted(indices.tolist()) == list(range(PER_CLASS)) and unit.shape == (PER_CLASS, 32)
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)


def test_planted_duplicates_are_found_and_nothing_else_at_identity(planted):
    shards = finished_shards(planted, read_manifest(planted))
    found = near_duplicates(shards, NAMES, threshold=0.9999)
    assert found["pairs"] == len(PLANTED)
    assert {(name, a, b) for _, name, a, b in found["worst"]} == {(NAMES[lb], src_i, i) for (lb, i), (_, src_i) in PLANTED.items()}
    assert found["per_class"] == {NAMES[0]: round(2 / 6, 4), NAMES[1]: 0.0, NAMES[2]: round(2 / 6, 4), NAMES[3]: round(2 / 6, 4)}


def test_inspect_reports_near_duplicates_of_a_valid_dataset(planted, capsys):
    from lbgen.cli import main

    found = inspect_dataset(planted)
    assert found.ok, found.defects
    assert found.near_duplicates["pairs"] >= len(PLANTED) and found.near_duplicates["worst"][0][0] == 1.0
    assert main(["inspect", str(planted), "--near-duplicate-cosine", "0.9999"]) == 0
    out = capsys.readouterr().out
    assert "near-duplicates (CLIP cosine >= 0.9999): 3 pair(s) within classes, 25.0% of images have one" in out


def test_not_a_dataset(tmp_path):
    assert not inspect_dataset(tmp_path).ok
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json is not a readable lbgen manifest"):
        read_manifest(tmp_path)


def test_rows_without_embeddings_are_named(tmp_path):
    from shape_shards import write_rows

    write_rows(tmp_path / DATA_DIR / "train-00000-of-00001.parquet", [{"label": 0, "index": 0}])
    with pytest.raises(DatasetError, match="without a CLIP embedding"):
        list(class_embeddings([tmp_path / DATA_DIR / "train-00000-of-00001.parquet"]))


def test_mean_pairwise_distance_is_zero_for_identical_and_positive_for_different_features():
    v = np.array([0.3, -1.2, 0.5])
    assert mean_pairwise_distance(np.stack([v, v, 2 * v])) == pytest.approx(0, abs=1e-7)
    assert mean_pairwise_distance(np.eye(3)) == pytest.approx(1.0)  # orthogonal: cosine distance 1
    assert mean_pairwise_distance(np.array([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(1 - 2 ** -0.5)
