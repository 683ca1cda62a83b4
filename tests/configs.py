"""Test helper: the tiny preset with overrides, the one way tests build a config."""

from __future__ import annotations

from pathlib import Path

from lbgen.config import Config, resolve


def tiny(**sections) -> Config:
    """The tiny preset with nested overrides per section (`tiny(finetune={"lr": 0.1})`)."""
    return resolve("tiny", overrides=sections)


def tiny_generate(table: Path | str, output: Path | str, **generate) -> Config:
    """The tiny preset generating from class table `table` into `output`: 2 rows per shard, batch and row group."""
    settings = {"rows_per_shard": 2, "row_group_rows": 2, "batch_size": 2, "output": str(output), **generate}
    return tiny(classes=str(table), generate=settings)
