"""`lbgen` command line: a thin layer over the stage functions.

One subcommand per stage of the registry (`lbgen.stages.STAGES`): its flags, pre-flight check
(run once, before Ray; what it checked goes to the stage), run function and closing line.

Every config field is a flag (see `lbgen <stage> --help`); precedence is
defaults < --preset < --config YAML < flags. Ray attaches to `--address` or
$RAY_ADDRESS when given, and otherwise starts a local Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lbgen.cli.flags import add_config_flags, overrides_from_args
from lbgen.config import PRESETS, Config, ConfigError, resolve, resolve_with_preset
from lbgen.errors import UserError, root_cause
from lbgen.stages import STAGES, stage

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


def inspect_command(directory: str, near_duplicate_cosine: float | None) -> int:
    """`lbgen inspect DIR`: print the summary, the near-duplicates and every defect; 1 if any defect."""
    from lbgen.data.reader import format_near_duplicates, format_summary, inspect_dataset

    found = inspect_dataset(directory, *([near_duplicate_cosine] if near_duplicate_cosine is not None else []))
    if found.summary:
        summary = dict(found.summary)
        extra = {k: summary.pop(k) for k in ("shards", "bytes", "generator")}
        print(format_summary(summary, extra))
    if found.near_duplicates:
        print(format_near_duplicates(found.near_duplicates))
    for defect in found.defects:
        print(f"DEFECT {defect}", file=sys.stderr)
    print(f"{directory}: {'valid' if found.ok else f'{len(found.defects)} defect(s)'}")
    return 0 if found.ok else 1


def report_command(directory: str, overrides: dict) -> None:
    """`lbgen report DIR`: rebuild the run report of DIR."""
    from lbgen.stages.report import build_report

    paths = build_report(directory, resolve(overrides=overrides).report)
    print(f"report: {paths['html']} (Markdown: {paths['markdown']})")


def first_line(command: str, preset: str | None, cfg: Config) -> str:
    """`lbgen finetune: preset tiny; model.generator tiny, ...`: the settings and models a run starts from."""
    def value(path: str):
        section, name = path.split(".")
        return getattr(getattr(cfg, section), name)

    models = "".join(f", {path} {value(path)}" for path in stage(command).models)
    return f"lbgen {command}: preset {preset or 'none (the paper settings)'}{models}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for each in STAGES:
        name, help_text = each.name, each.help
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="base settings over the defaults below (default: the --config file's `preset`, else none: "
                            "the defaults are the paper's settings; `tiny` runs small random models on a CPU)")
        p.add_argument("--config", default=None, help="YAML file overriding the preset (e.g. jobs/generate-tiny.yaml)")
        p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
        add_config_flags(p, each.flags)
        if name == "generate":  # Ray Data's word for the actor count
            p.add_argument("--concurrency", dest="cfg:generate.workers", type=int, default=argparse.SUPPRESS,
                           metavar="WORKERS", help="alias of --workers")
    p = sub.add_parser("inspect", help="validate a generated dataset and print its summary")
    p.add_argument("dir", help="dataset directory (local path or URI such as s3://bucket/ds) written by `lbgen generate`")
    p.add_argument("--near-duplicate-cosine", type=float, default=None, metavar="COS",
                   help="CLIP cosine at or above which two images of a class count as near-duplicates "
                        "(default: lbgen.data.reader.NEAR_DUPLICATE_COSINE, 0.95)")
    p = sub.add_parser("report", help="(re)build DIR/report.html and DIR/report.md of a run")
    p.add_argument("dir", help="run directory written by `lbgen run`")
    add_config_flags(p, ("report",), top_level=False)
    return parser


def refuse(command: str, err: BaseException) -> int:
    """Print `lbgen COMMAND: error: ...` as exactly one line (a control character in a user's input,
    such as a path holding a newline, is shown escaped) and return exit code 2."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(err))
    print(f"lbgen {command}: error: {text}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        try:
            return inspect_command(args.dir, args.near_duplicate_cosine)
        except UserError as err:
            return refuse("inspect", err)
    if args.command == "report":
        try:
            report_command(args.dir, overrides_from_args(args))
        except USER_ERRORS as err:
            return refuse("report", err)
        return 0
    command = stage(args.command)
    try:
        cfg, preset = resolve_with_preset(args.preset, args.config, overrides_from_args(args))
        print(first_line(args.command, preset, cfg))
        ray_address(args.address)
        # Bad input fails here, in seconds and before a cluster starts; what the check found (the
        # class table, the scanned shards, ...) goes to the stage, which then does not check again.
        checked = command.check_inputs(cfg)
        if command.ray:
            init_ray(args.address)
        print(command.done_line(cfg, command.call(cfg, checked)))
    except USER_ERRORS as err:
        return refuse(args.command, err)
    except Exception as err:
        cause = root_cause(err)
        if isinstance(cause, USER_ERRORS):
            return refuse(args.command, cause)
        raise
    return 0

