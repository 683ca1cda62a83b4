"""`lbgen` command line: a thin layer over the stage functions.

Every config field is a flag (see `lbgen <stage> --help`); precedence is
defaults < --preset < --config YAML < flags. Ray attaches to `--address` or
$RAY_ADDRESS when given, and otherwise starts a local Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from lbgen.config import (
    PRESETS,
    Config,
    ConfigError,
    add_config_flags,
    overrides_from_args,
    require_local,
    resolve,
    resolve_with_preset,
)
from lbgen.data.classes import load_class_table
from lbgen.errors import UserError

# Errors whose message is the whole story: printed as one line, no traceback. PermissionError and
# FileNotFoundError come from the OS (an unwritable or vanished path) with the path in the message.
USER_ERRORS = (UserError, PermissionError, FileNotFoundError)


def ray_address(address: str | None) -> str | None:
    """`address` or $RAY_ADDRESS; a Jobs API URL in their place is an error (checked before anything runs)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        # The dashboard URL that `ray job submit` takes; ray.init needs the cluster (GCS) address.
        raise ConfigError(
            f"Ray address {address!r} is a Jobs API (dashboard) URL: submit with "
            f"`ray job submit --address {address} -- lbgen ...`, or give the cluster address (host:6379)"
        )
    return address


def init_ray(address: str | None) -> None:
    """Attach to a cluster (`address` or $RAY_ADDRESS) or start a local Ray.

    A Ray Job's entrypoint finds $RAY_ADDRESS set to its cluster by Ray, so `ray job submit -- lbgen ...`
    attaches instead of starting a second Ray on the head node.
    """
    import ray

    address = ray_address(address)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # A local cluster needs no auth token (Ray would write one under $HOME).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers' logs stay in Ray's session logs unless LBGEN_RAY_LOGS=1: lbgen draws its own progress.
    ray.init(logging_level=logging.WARNING, log_to_driver=os.environ.get("LBGEN_RAY_LOGS") == "1")


def run_finetune(cfg: Config, checked) -> None:
    from lbgen.stages.finetune import finetune

    output = finetune(cfg, table=checked)  # the inputs the pre-flight checked: not checked twice
    print(f"fine-tuned LoRA: {output / 'pytorch_lora_weights.safetensors'}")


def run_generate(cfg: Config, checked) -> None:
    from lbgen.stages.generate import generate, summary_text

    manifest = generate(cfg)
    print(summary_text(manifest))
    print(f"dataset: {cfg.generate.output}")


def inspect_command(directory: str) -> int:
    """`lbgen inspect DIR`: print the summary and every defect; 1 if any defect."""
    from lbgen.data.dataset import format_summary, inspect_dataset

    found = inspect_dataset(directory)
    if found.summary:
        summary = dict(found.summary)
        extra = {k: summary.pop(k) for k in ("shards", "bytes", "generator")}
        print(format_summary(summary, extra))
    for defect in found.defects:
        print(f"DEFECT {defect}", file=sys.stderr)
    print(f"{directory}: {'valid' if found.ok else f'{len(found.defects)} defect(s)'}")
    return 0 if found.ok else 1


def report_command(directory: str, overrides: dict) -> None:
    """`lbgen report DIR`: rebuild the run report of DIR."""
    from lbgen.stages.report import build_report

    paths = build_report(directory, resolve(overrides=overrides).report)
    print(f"report: {paths['html']} (Markdown: {paths['markdown']})")


def run_pretrain(cfg: Config, checked) -> None:
    from lbgen.stages.pretrain import pretrain

    output = pretrain(cfg, shards=checked)  # the shards the pre-flight checked: not scanned twice
    print(f"pre-trained backbone: {output / 'backbone.safetensors'} (+ model.json)")


def run_evaluate(cfg: Config, checked) -> None:
    from lbgen.stages.evaluate import evaluate

    output = evaluate(cfg)
    print(f"results: {output / 'results.md'}")


def run_all(cfg: Config, checked) -> None:
    from lbgen.stages.run import run

    output = run(cfg)
    print(f"all stages done: {output} (results: {output / 'evaluate' / 'results.md'}, report: {output / 'report.html'})")


def run_make_downstream(cfg: Config, checked) -> None:
    from lbgen.data.downstream import make_downstream

    md = cfg.make_downstream
    output = make_downstream(md.kind, md.output, train_per_class=md.train_per_class, test_per_class=md.test_per_class, size=md.size, seed=cfg.seed)
    print(f"downstream dataset ({md.kind}): {output}")


# Stage name -> (config sections its flags come from, function(cfg, what `check_inputs` returned), help).
COMMANDS: dict[str, tuple[tuple[str, ...], Callable[[Config, Any], None], str]] = {
    "finetune": (("model", "finetune"), run_finetune, "fine-tune the generator with lbGen's losses (Ray Train)"),
    "generate": (("model", "generate"), run_generate, "generate the labelled dataset as Parquet shards (Ray Data)"),
    "pretrain": (("pretrain",), run_pretrain, "pre-train a timm backbone on generated shards (Ray Train + Ray Data)"),
    "evaluate": (("evaluate",), run_evaluate, "transfer of backbones to downstream sets: linear probe or fine-tune, bias metrics"),
    "run": (("model", "run", "report"), run_all, "every stage end to end into one directory, skipping completed stages"),
    "make-downstream": (("make_downstream",), run_make_downstream, "write a procedural downstream dataset (ImageFolder)"),
}

# Commands that need no Ray.
LOCAL_COMMANDS = {"make-downstream"}

# Command -> module whose `check_inputs(cfg)` refuses unusable inputs and outputs before Ray starts.
INPUT_CHECKS = {name: f"lbgen.stages.{name}" for name in ("finetune", "generate", "pretrain", "evaluate", "run")}


# Per command, the models it resolves: named in its first line, so a run never builds models silently.
SHOWN_MODELS = {
    "finetune": ("model.generator", "model.clip", "model.iqa"),
    "generate": ("model.generator", "model.clip", "model.iqa"),
    "run": ("model.generator", "model.clip", "model.iqa", "pretrain.model"),
    "pretrain": ("pretrain.model",),
    "evaluate": ("evaluate.backbone",),
}


def first_line(command: str, preset: str | None, cfg: Config) -> str:
    """`lbgen finetune: preset tiny; model.generator tiny, ...`: the settings and models a run starts from."""
    def value(path: str):
        section, name = path.split(".")
        return getattr(getattr(cfg, section), name)

    models = "".join(f", {path} {value(path)}" for path in SHOWN_MODELS.get(command, ()))
    return f"lbgen {command}: preset {preset or 'none (the paper settings)'}{models}"


def check_inputs(command: str, cfg: Config) -> Any:
    """Bad input fails here, in seconds and before a cluster starts; returns what the stage's check found.

    A stage called from Python checks its inputs itself; `pretrain` takes the checked
    shards back so that an ImageNet-scale dataset is scanned once.
    """
    from importlib import import_module

    from lbgen.runtime.training import check_output_dir

    if command == "make-downstream":
        require_local(cfg, "make_downstream")
        check_output_dir(cfg.make_downstream.output, "make_downstream.output")
    elif command in INPUT_CHECKS:
        return import_module(INPUT_CHECKS[command]).check_inputs(cfg)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (sections, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="base settings over the defaults below (default: the --config file's `preset`, else none: "
                            "the defaults are the paper's settings; `tiny` runs small random models on a CPU)")
        p.add_argument("--config", default=None, help="YAML file overriding the preset (e.g. jobs/generate-tiny.yaml)")
        p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
        add_config_flags(p, sections)
        if name == "generate":  # Ray Data's word for the actor count
            p.add_argument("--concurrency", dest="cfg:generate.workers", type=int, default=argparse.SUPPRESS,
                           metavar="WORKERS", help="alias of --workers")
    p = sub.add_parser("inspect", help="validate a generated dataset and print its summary")
    p.add_argument("dir", help="dataset directory (local path or URI such as s3://bucket/ds) written by `lbgen generate`")
    p = sub.add_parser("report", help="(re)build DIR/report.html and DIR/report.md of a run")
    p.add_argument("dir", help="run directory written by `lbgen run`")
    add_config_flags(p, ("report",), top_level=False)
    return parser


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception: Ray wraps worker errors (WorkerGroupError -> RayTaskError -> cause)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        inner = failures[min(failures)] if failures else getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        try:
            return inspect_command(args.dir)
        except UserError as err:
            print(f"lbgen inspect: error: {err}", file=sys.stderr)
            return 2
    if args.command == "report":
        try:
            report_command(args.dir, overrides_from_args(args))
        except USER_ERRORS as err:
            print(f"lbgen report: error: {err}", file=sys.stderr)
            return 2
        return 0
    _, command, _ = COMMANDS[args.command]
    try:
        cfg, preset = resolve_with_preset(args.preset, args.config, overrides_from_args(args))
        print(first_line(args.command, preset, cfg))
        ray_address(args.address)
        load_class_table(cfg.classes)
        checked = check_inputs(args.command, cfg)
        if args.command not in LOCAL_COMMANDS:
            init_ray(args.address)
        command(cfg, checked)
    except USER_ERRORS as err:
        print(f"lbgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        cause = root_cause(err)
        if isinstance(cause, USER_ERRORS):
            print(f"lbgen {args.command}: error: {cause}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
