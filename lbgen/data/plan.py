"""The plan of a dataset: one row per image, assigned to shards; torch-free so Ray's plan tasks start fast.

An image is (label, index); its seed is `derive_seed(run seed, label, index)`, so no batching, sharding or
worker count changes it. Shard k holds positions [k*R, (k+1)*R) (R = `generate.rows_per_shard`) of a seeded
permutation of all images (`row_order`): every shard is a sample of every class. With the images in class
order instead, a 1,000-row shard of ImageNet would hold one or two classes, and a training batch drawn
through a shuffle buffer of a few shards would see a few dozen of the 1,000.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial

import numpy as np

from lbgen.config import Config
from lbgen.data.classes import ClassTable
from lbgen.runtime.seeds import derive_seed


def num_shards(num_classes: int, cfg: Config) -> int:
    return math.ceil(num_classes * cfg.generate.images_per_class / cfg.generate.rows_per_shard)


def shard_sizes(num_classes: int, cfg: Config) -> list[int]:
    """Rows of each shard, in shard order: what `batch_rows` makes of it, counted without making it."""
    total, per_shard = num_classes * cfg.generate.images_per_class, cfg.generate.rows_per_shard
    return [min(per_shard, total - start) for start in range(0, total, per_shard)]


# Part of every dataset's content (lbgen.stages.generate.content_settings): a dataset written in another
# order is another dataset, so a re-run never resumes it into a mix of both.
SHARD_ORDER = "seeded-permutation"


@lru_cache(maxsize=4)
def row_order(total: int, seed: int) -> np.ndarray:
    """Image numbers (label * images_per_class + index) in shard order: a permutation seeded by the run's seed.
    Made once per process (1.3 M images: 10 MB, ~20 ms)."""
    return np.random.default_rng(derive_seed(seed, "shard-order")).permutation(total)


def batches_of(shards: list[int], shard_sizes_: list[int], batch_size: int) -> list[dict]:
    """The units of work of `shards`: {"shard", "start", "stop"} slices of at most `batch_size` rows of each.

    A batch, not a shard, is what a generation actor takes: a straggling GPU or a lost node then holds up or
    re-makes a few batches, never a whole shard (10 minutes on an A100, more on an L4)."""
    return [{"shard": k, "start": start, "stop": min(start + batch_size, shard_sizes_[k])}
            for k in shards for start in range(0, shard_sizes_[k], batch_size)]


def batch_rows(item: dict, *, names: tuple[str, ...], ids: tuple[str, ...], cfg: Config) -> list[dict]:
    """Plan rows of shard `item["shard"]`, positions `item["start"]` to `item["stop"]` within it (the whole
    shard when absent).

    Labels follow table rows (never names), so repeated names keep distinct labels.
    """
    gen = cfg.generate
    total = len(names) * gen.images_per_class
    first = item["shard"] * gen.rows_per_shard
    stop = min(first + gen.rows_per_shard, total) if item.get("stop") is None else first + item["stop"]
    order = row_order(total, cfg.seed)
    rows = []
    for position in range(first + item.get("start", 0), stop):
        label, index = divmod(int(order[position]), gen.images_per_class)
        rows.append({
            "label": label,
            "class_id": ids[label],
            "class_name": names[label],
            "index": index,
            "seed": derive_seed(cfg.seed, label, index),
            "prompt": gen.prompt_template.format(name=names[label]),
            "shard": item["shard"],
            "position": position - first,  # within the shard: names the part file its batch becomes
        })
    return rows


def plan(table: ClassTable, cfg: Config) -> list[dict]:
    """Every row of the dataset, in shard order (for tests and small runs; the pipeline plans per batch)."""
    plan_shard = partial(batch_rows, names=table.names, ids=table.ids, cfg=cfg)
    return [row for k in range(num_shards(len(table), cfg)) for row in plan_shard({"shard": k})]
