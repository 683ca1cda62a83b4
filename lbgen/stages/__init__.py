"""The pipeline's stages, one `Stage` record each, in pipeline order: the one list that the CLI
(subcommands, flags, pre-flight, first line), `run` (order, directories, completion), `report`
(status table, sections) and config (`require_local`'s fields) read.

Light at import (no torch, Ray or pyarrow: `lbgen --help` imports this): implementations are
named as "module:function" strings and imported when called.
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
    # Its own config section; `local_fields` are fields of it.
    section: str
    # "module:function" `(cfg) -> checked`: refuses bad input before Ray starts; returns what it checked.
    check: str
    # "module:function" `(cfg, checked) -> result`: runs the stage; `checked` None means "check yourself".
    run: str
    # "module:function" `(cfg, result) -> str`: what the CLI prints when the stage is done.
    done: str
    # Fields of `section` read or written through the local file system only (no object-store URI).
    local_fields: tuple[str, ...] = ()
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
        check="lbgen.stages.finetune:check_inputs", run="lbgen.stages:run_finetune", done="lbgen.stages:done_finetune",
        local_fields=("output",), models=GENERATION_MODELS,
        directory="finetune", complete="lbgen.stages:finetune_complete", report="lbgen.stages.report:finetune_section",
    ),
    Stage(
        "generate", "generate the labelled dataset as Parquet shards (Ray Data)", ("model", "generate"), "generate",
        check="lbgen.stages.generate:check_inputs", run="lbgen.stages:run_generate", done="lbgen.stages:done_generate",
        models=GENERATION_MODELS,
        directory="generate", complete="lbgen.data.reader:dataset_complete", report="lbgen.stages.report:dataset_section",
    ),
    Stage(
        "make-downstream", "write a procedural downstream dataset (ImageFolder)", ("make_downstream",), "make_downstream",
        check="lbgen.stages:check_make_downstream", run="lbgen.stages:run_make_downstream",
        done="lbgen.stages:done_make_downstream", local_fields=("output",), ray=False,
        directory="downstream", complete="lbgen.stages:downstream_complete", rerun=True,
    ),
    Stage(
        "pretrain", "pre-train a timm backbone on generated shards (Ray Train + Ray Data)", ("pretrain",), "pretrain",
        check="lbgen.stages.pretrain:check_inputs", run="lbgen.stages:run_pretrain", done="lbgen.stages:done_pretrain",
        local_fields=("output",), models=("pretrain.model",),
        directory="pretrain", complete="lbgen.stages:pretrain_complete", report="lbgen.stages.report:pretrain_section",
    ),
    Stage(
        "evaluate", "transfer of backbones to downstream sets: linear probe or fine-tune, bias metrics", ("evaluate",),
        "evaluate", check="lbgen.stages:check_evaluate", run="lbgen.stages:run_evaluate", done="lbgen.stages:done_evaluate",
        local_fields=("output", "backbone", "downstream", "bias", "data_root"), models=("evaluate.backbone",),
        directory="evaluate", complete="lbgen.stages:evaluate_complete", report="lbgen.stages.report:evaluate_section",
    ),
    Stage(
        "run", "every stage end to end into one directory, skipping completed stages", ("model", "run", "report"), "run",
        check="lbgen.stages.run:check_inputs", run="lbgen.stages:run_all", done="lbgen.stages:done_run",
        local_fields=("output",), models=(*GENERATION_MODELS, "pretrain.model"),
    ),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    """The stage of subcommand `name`."""
    return BY_NAME[name]


def run_steps() -> tuple[Stage, ...]:
    """The stages `lbgen run` runs, in order, each into its own subdirectory."""
    return tuple(s for s in STAGES if s.directory)


def local_fields(section: str) -> tuple[str, ...]:
    """The fields of config section `section` that take local paths only (config's `require_local`)."""
    return next((s.local_fields for s in STAGES if s.section == section), ())


# ---------------------------------------------------------------- checks the stage modules do not hold


def check_make_downstream(cfg: Config) -> None:
    from lbgen.config import require_local
    from lbgen.data.classes import load_class_table
    from lbgen.runtime.training import check_output_dir

    load_class_table(cfg.classes)  # every command refuses a bad --classes, as it always has
    require_local(cfg, "make_downstream")
    check_output_dir(cfg.make_downstream.output, "make_downstream.output")


def check_evaluate(cfg: Config) -> None:
    from lbgen.data.classes import load_class_table
    from lbgen.stages.evaluate import check_inputs

    load_class_table(cfg.classes)  # every command refuses a bad --classes, as it always has
    check_inputs(cfg)


# ---------------------------------------------------------------- running (checked: what the pre-flight returned)


def run_finetune(cfg: Config, checked=None) -> Path:
    from lbgen.stages.finetune import finetune

    return finetune(cfg, table=checked)  # the table the pre-flight checked: the quality probe runs once


def run_generate(cfg: Config, checked=None) -> dict:
    from lbgen.stages.generate import generate

    return generate(cfg, checked)  # the table and LoRA the pre-flight checked: not loaded twice


def run_make_downstream(cfg: Config, checked=None) -> Path:
    from lbgen.data.downstream import make_downstream

    md = cfg.make_downstream
    return make_downstream(md.kind, md.output, train_per_class=md.train_per_class, test_per_class=md.test_per_class,
                           size=md.size, seed=cfg.seed)


def run_pretrain(cfg: Config, checked=None) -> Path:
    from lbgen.stages.pretrain import pretrain

    return pretrain(cfg, shards=checked)  # the shards the pre-flight checked: not scanned twice


def run_evaluate(cfg: Config, checked=None) -> Path:
    from lbgen.stages.evaluate import evaluate

    return evaluate(cfg)


def run_all(cfg: Config, checked=None) -> Path:
    from lbgen.stages.run import run

    return run(cfg, checked=checked)


# ---------------------------------------------------------------- what the CLI prints when done


def done_finetune(cfg: Config, output: Path) -> str:
    return f"fine-tuned LoRA: {output / 'pytorch_lora_weights.safetensors'}"


def done_generate(cfg: Config, manifest: dict) -> str:
    from lbgen.stages.generate import summary_text

    return f"{summary_text(manifest)}\ndataset: {cfg.generate.output}"


def done_make_downstream(cfg: Config, output: Path) -> str:
    return f"downstream dataset ({cfg.make_downstream.kind}): {output}"


def done_pretrain(cfg: Config, output: Path) -> str:
    return f"pre-trained backbone: {output / 'backbone.safetensors'} (+ model.json)"


def done_evaluate(cfg: Config, output: Path) -> str:
    return f"results: {output / 'results.md'}"


def done_run(cfg: Config, output: Path) -> str:
    return f"all stages done: {output} (results: {output / 'evaluate' / 'results.md'}, report: {output / 'report.html'})"


# ---------------------------------------------------------------- completion markers


def finetune_complete(directory: Path) -> bool:
    from lbgen.models.generator import LORA_FILE

    return (directory / LORA_FILE).exists()


def downstream_complete(directory: Path) -> bool:
    return (directory / "train").is_dir()


def pretrain_complete(directory: Path) -> bool:
    return (directory / "backbone.safetensors").exists()


def evaluate_complete(directory: Path) -> bool:
    return (directory / "results.csv").exists()
