"""The pipeline's stages, one `Stage` record each, in pipeline order: the one list that the CLI
(subcommands, flags, pre-flight, first line), `run` (order, directories, completion) and `report`
(status table, sections) read.

Light at import (no torch, Ray or pyarrow: `lbgen --help` imports this): implementations are
named as "module:function" strings and imported when called, so this registry imports none of
the stage modules that read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lbgen.config import Config


def resolve_ref(ref: str) -> Callable:
    """The function a "module:function" string names, imported now."""
    module, name = ref.split(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline and everything the CLI, `run`, `report` and config need of it."""

    # Its `lbgen` subcommand.
    name: str
    # The subcommand's help line.
    help: str
    # Config sections its flags come from (top-level fields such as `classes` always are).
    flags: tuple[str, ...]
    # Its own config section (its local-only fields: `lbgen.config.LOCAL_FIELDS`).
    section: str
    # "module:function" `(cfg) -> checked`: refuses bad input before Ray starts; returns what it checked.
    check: str
    # "module:function" `(cfg, checked) -> result`: runs the stage; `checked` None means "check yourself".
    run: str
    # "module:function" `(cfg, result) -> str`: what the CLI prints when the stage is done.
    done: str
    # Config paths of the models it resolves: named in the CLI's first line.
    models: tuple[str, ...] = ()
    # Whether it needs Ray (the CLI attaches or starts one first).
    ray: bool = True
    # Its subdirectory of a `lbgen run` directory, in run order; None: not a step of `run`.
    directory: str | None = None
    # "module:function" `(directory) -> bool`: whether `directory` holds its finished output.
    complete: str | None = None
    # `run` rewrites it every time instead of skipping it when complete (cheap and seeded).
    rerun: bool = False
    # "module:function" `(report, directory, report_cfg)`: its section of the run report; None: none.
    report: str | None = None

    def check_inputs(self, cfg: Config) -> Any:
        return resolve_ref(self.check)(cfg)

    def call(self, cfg: Config, checked: Any = None) -> Any:
        return resolve_ref(self.run)(cfg, checked)

    def done_line(self, cfg: Config, result: Any) -> str:
        return resolve_ref(self.done)(cfg, result)

    def is_complete(self, directory: Path) -> bool:
        return resolve_ref(self.complete)(Path(directory))


GENERATION_MODELS = ("model.generator", "model.clip", "model.iqa")

STAGES: tuple[Stage, ...] = (
    Stage(
        "finetune", "fine-tune the generator with lbGen's losses (Ray Train)", ("model", "finetune"), "finetune",
        check="lbgen.stages.finetune:check_inputs", run="lbgen.stages.finetune:finetune", done="lbgen.stages.finetune:done_line",
        models=GENERATION_MODELS,
        directory="finetune", complete="lbgen.stages.finetune:is_complete", report="lbgen.stages.report:finetune_section",
    ),
    Stage(
        "generate", "generate the labelled dataset as Parquet shards (Ray Data)", ("model", "generate"), "generate",
        check="lbgen.stages.generate:check_inputs", run="lbgen.stages.generate:generate", done="lbgen.stages.generate:done_line",
        models=GENERATION_MODELS,
        directory="generate", complete="lbgen.data.reader:dataset_complete", report="lbgen.stages.report:dataset_section",
    ),
    Stage(
        "benchmark", "time steady generation on this machine's device; project the dataset's GPU-hours and cost",
        ("model", "generate", "benchmark"), "benchmark", check="lbgen.stages.benchmark:check_inputs",
        run="lbgen.stages.benchmark:benchmark", done="lbgen.stages.benchmark:done_line", models=GENERATION_MODELS, ray=False,
    ),
    Stage(
        "make-downstream", "write a procedural downstream dataset (ImageFolder)", ("make_downstream",), "make_downstream",
        check="lbgen.stages.make_downstream:check_inputs", run="lbgen.stages.make_downstream:make",
        done="lbgen.stages.make_downstream:done_line", ray=False,
        directory="downstream", complete="lbgen.stages.make_downstream:is_complete", rerun=True,
    ),
    Stage(
        "pretrain", "pre-train a timm backbone on generated shards (Ray Train + Ray Data)", ("pretrain",), "pretrain",
        check="lbgen.stages.pretrain:check_inputs", run="lbgen.stages.pretrain:pretrain", done="lbgen.stages.pretrain:done_line",
        models=("pretrain.model",),
        directory="pretrain", complete="lbgen.stages.pretrain:is_complete", report="lbgen.stages.report:pretrain_section",
    ),
    Stage(
        "evaluate", "transfer of backbones to downstream sets: linear probe or fine-tune, bias metrics", ("evaluate",),
        "evaluate", check="lbgen.stages.evaluate:check_inputs", run="lbgen.stages.evaluate:evaluate",
        done="lbgen.stages.evaluate:done_line", models=("evaluate.backbone",),
        directory="evaluate", complete="lbgen.stages.evaluate:is_complete", report="lbgen.stages.report:evaluate_section",
    ),
    Stage(
        "run", "every stage end to end into one directory, skipping completed stages", ("model", "run", "report"), "run",
        check="lbgen.stages.run:check_inputs", run="lbgen.stages.run:run", done="lbgen.stages.run:done_line",
        models=(*GENERATION_MODELS, "pretrain.model"),
    ),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    """The stage of subcommand `name`."""
    return BY_NAME[name]


def run_steps() -> tuple[Stage, ...]:
    """The stages `lbgen run` runs, in order, each into its own subdirectory."""
    return tuple(s for s in STAGES if s.directory)
