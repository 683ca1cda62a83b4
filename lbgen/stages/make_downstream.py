"""The `make-downstream` stage: a procedural downstream set (`lbgen.data.shapes`) written as an ImageFolder."""

from __future__ import annotations

from pathlib import Path

from lbgen.config import Config, require_local
from lbgen.data.classes import load_class_table
from lbgen.runtime.outputs import check_output_dir


def check_inputs(cfg: Config) -> None:
    """Refuse a bad class table or an unusable output before anything is written."""
    load_class_table(cfg.classes)  # every command refuses a bad --classes, as it always has
    require_local(cfg, "make_downstream")
    check_output_dir(cfg.make_downstream.output, "make_downstream.output")


def make(cfg: Config, checked: None = None) -> Path:
    """Write the set `cfg.make_downstream` describes; returns its directory. Seeded: a rerun writes the same files."""
    from lbgen.data.downstream import make_downstream

    md = cfg.make_downstream
    return make_downstream(md.kind, md.output, train_per_class=md.train_per_class, test_per_class=md.test_per_class,
                           size=md.size, seed=cfg.seed)


def done_line(cfg: Config, output: Path) -> str:
    """What the CLI prints when the set is written."""
    return f"downstream dataset ({cfg.make_downstream.kind}): {output}"


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds a written set."""
    return (Path(directory) / "train").is_dir()
