"""lbgen.data.plan: every image once, shards that mix classes, seeds that no layout changes (no models)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lbgen.config import resolve
from lbgen.data.classes import ClassTable, load_class_table
from lbgen.data.format import label_names
from lbgen.data.plan import num_shards, plan, row_order, shard_sizes


def test_plan_has_every_label_index_once_and_labels_follow_rows():
    cfg = resolve("tiny", overrides={"generate": {"images_per_class": 3, "rows_per_shard": 7}})
    table = load_class_table(cfg.classes)
    rows = plan(table, cfg)
    assert len(rows) == len(table) * 3
    assert sorted((r["label"], r["index"]) for r in rows) == [(c, i) for c in range(len(table)) for i in range(3)]
    for r in rows:
        assert r["class_name"] == table.names[r["label"]] and r["class_id"] == table.ids[r["label"]]
        assert r["prompt"] == r["class_name"]
    # Shards: deterministic contiguous blocks of 7 rows, the last one shorter.
    assert [r["shard"] for r in rows] == [p // 7 for p in range(len(rows))]


def test_plan_keeps_imagenet_duplicate_names_apart():
    cfg = resolve("tiny", overrides={"classes": "imagenet1k", "generate": {"images_per_class": 1}})
    table = load_class_table("imagenet1k")
    rows = plan(table, cfg)
    for name in ("missile", "sunglasses"):
        twins = [r for r in rows if r["class_name"] == name]
        assert len(twins) == 2 and twins[0]["label"] != twins[1]["label"]
        assert twins[0]["class_id"] != twins[1]["class_id"] and twins[0]["seed"] != twins[1]["seed"]
    names = label_names(table.ids, table.names)
    assert len(set(names)) == 1000  # HF ClassLabel needs unique names
    assert names[next(r for r in rows if r["label"] == 0)["label"]] == table.names[0]


@settings(max_examples=40, deadline=None)
@given(classes=st.integers(1, 7), per_class=st.integers(1, 9), per_shard=st.integers(1, 25))
def test_plan_property_every_image_once_in_the_seeded_order(classes, per_class, per_shard):
    table = ClassTable(ids=tuple(f"c{i}" for i in range(classes)), names=("same",) * classes, source="mem")
    cfg = resolve("tiny", overrides={"generate": {"images_per_class": per_class, "rows_per_shard": per_shard}})
    rows = plan(table, cfg)
    assert sorted((r["label"], r["index"]) for r in rows) == [(c, i) for c in range(classes) for i in range(per_class)]
    assert [r["label"] * per_class + r["index"] for r in rows] == row_order(classes * per_class, cfg.seed).tolist()
    sizes = Counter(r["shard"] for r in rows)
    assert sorted(sizes) == list(range(num_shards(classes, cfg)))
    assert all(n == per_shard for k, n in sizes.items() if k < len(sizes) - 1) and 0 < sizes[len(sizes) - 1] <= per_shard
    assert shard_sizes(classes, cfg) == [sizes[k] for k in range(len(sizes))]


def test_seeds_do_not_depend_on_sharding():
    table = load_class_table("tiny10")
    a = {(r["label"], r["index"]): r["seed"] for r in plan(table, resolve("tiny", overrides={"generate": {"rows_per_shard": 3}}))}
    b = {(r["label"], r["index"]): r["seed"] for r in plan(table, resolve("tiny", overrides={"generate": {"rows_per_shard": 50}}))}
    assert a == b and len(set(a.values())) == len(a)
    c = plan(table, resolve("tiny", overrides={"seed": 1, "generate": {"rows_per_shard": 3}}))
    assert all(a[(r["label"], r["index"])] != r["seed"] for r in c)
