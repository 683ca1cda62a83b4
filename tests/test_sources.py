"""pretrain's other sources: an ImageFolder keyed by class id and plain image/label Parquet, read like shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shape_shards import shape_rows, write_shape_shards

from lbgen.config import resolve
from lbgen.data.classes import load_class_table
from lbgen.data.shards import RowFilter, ShardError, ShardSet
from lbgen.data.sources import ImageFolderSource, PlainParquetSource, open_training_data
from lbgen.runtime.storage import locate
from lbgen.data.transforms import ImageTransform, decode_batch

TABLE = load_class_table("tiny10")
SPLIT = RowFilter(seed=0, val_fraction=0.25)


@pytest.fixture(scope="module")
def same_images(tmp_path_factory) -> dict[str, Path]:
    """The same 10 x 12 shape images as lbgen shards, as `train/<class_id>/<index>.jpg` and as plain Parquet
    (two files, row groups of 16 rows, rows in another order)."""
    root = tmp_path_factory.mktemp("sources")
    rows = shape_rows(TABLE, per_class=12, size=32)
    for row in rows:
        path = root / "imagefolder" / "train" / row["class_id"] / f"{row['index']:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(row["image"]["bytes"])
    plain = [{"image": {"bytes": r["image"]["bytes"], "path": None}, "label": r["label"]} for r in rows[::-1]]
    (root / "plain").mkdir()
    for i in range(2):
        pq.write_table(pa.Table.from_pylist(plain[i::2]), root / "plain" / f"train-{i}.parquet", row_group_size=16)
    return {"shards": write_shape_shards(root / "shards", TABLE, per_class=12, size=32),
            "imagefolder": root / "imagefolder" / "train", "plain": root / "plain"}


def read_split(source, split: str) -> list[tuple[int, bytes]]:
    """(label, decoded pixels) of `split`'s rows, through Ray Data as pretrain reads them (eval crops)."""
    spec = ImageTransform(32, train=False, crop_pct=1.0)
    batches = source.read(False, 50, ["image", "label", "index"]).map_batches(
        decode_batch, batch_format="pyarrow", fn_kwargs={"spec": spec, "rows": SPLIT, "split": split}).iter_batches(batch_size=None)
    return sorted((int(label), image.tobytes()) for batch in batches for label, image in zip(batch["label"], batch["image"]))


def test_each_source_is_recognised_and_counted(same_images):
    kinds = {name: open_training_data([str(path)], TABLE, SPLIT) for name, path in same_images.items()}
    assert isinstance(kinds["shards"], ShardSet)
    assert isinstance(kinds["imagefolder"], ImageFolderSource) and isinstance(kinds["plain"], PlainParquetSource)
    for source in kinds.values():
        assert source.rows == 120 and source.train_rows + source.val_rows == 120 and 0 < source.val_rows < 60
    # Files named by index: the ImageFolder's held-out rows are the shards' own.
    assert kinds["imagefolder"].val_rows == kinds["shards"].val_rows
    plain = kinds["plain"]
    assert [u["first_index"] for u in plain.units] == list(range(0, 120, 16))[:4] + list(range(60, 120, 16))
    assert json.loads(json.dumps(plain.to_json()))["kind"] == "parquet"


@pytest.mark.ray
def test_an_image_folder_and_plain_parquet_read_the_same_images_as_the_shards(ray_local, same_images):
    sources = {name: open_training_data([str(path)], TABLE, SPLIT) for name, path in same_images.items()}
    everything = {name: sorted(read_split(s, "train") + read_split(s, "val")) for name, s in sources.items()}
    assert len(everything["shards"]) == 120
    assert everything["imagefolder"] == everything["shards"] == everything["plain"]
    assert read_split(sources["imagefolder"], "val") == read_split(sources["shards"], "val")


def test_bad_sources_are_refused_naming_the_input(same_images, tmp_path):
    stray = tmp_path / "train"
    (stray / "n99999999").mkdir(parents=True)
    (stray / "n99999999" / "a.jpg").write_bytes((same_images["imagefolder"] / TABLE.ids[0] / "00000.jpg").read_bytes())
    with pytest.raises(ShardError, match=r"1 folder\(s\) name no class id of the class table .*: n99999999"):
        ImageFolderSource.open(locate(stray), TABLE, SPLIT)
    with pytest.raises(ShardError, match="has no score columns"):
        open_training_data([str(same_images["plain"])], TABLE, RowFilter(min_clip_score=0.2))
    pq.write_table(pa.table({"image": [b"x"], "label": [10]}), tmp_path / "labels.parquet")
    with pytest.raises(ShardError, match=r"labels\.parquet: labels must be rows of the class table \(0\.\.9"):
        open_training_data([str(tmp_path / "labels.parquet")], TABLE, SPLIT)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("kind", ["imagefolder", "plain"])
def test_pretrain_trains_from_an_image_folder_and_from_plain_parquet(ray_local, same_images, tmp_path, kind):
    from lbgen.stages.pretrain import pretrain

    train_rows = open_training_data([str(same_images[kind])], TABLE, SPLIT).train_rows  # the run's split: seed 0, 25 %
    output = pretrain(resolve("tiny", overrides={"pretrain": {"data": [str(same_images[kind])], "output": str(tmp_path / "run"),
                                                               "epochs": 2, "batch_size": 16, "val_fraction": 0.25}}))
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(np.isfinite(m["train_loss"]) for m in metrics)
    assert metrics[0]["step"] == train_rows // 16 and metrics[1]["val_images"] == 120 - train_rows
    assert json.loads((output / "shards.json").read_text())["kind"] == {"imagefolder": "imagefolder", "plain": "parquet"}[kind]
    assert json.loads((output / "model.json").read_text())["num_classes"] == len(TABLE)

