"""Config fields as command-line flags: one `--flag` per leaf field, its help from the schema.

A flag is named after its leaf (`finetune.cluster.workers` -> `--workers`); its help is the
field's comment, its config path and its default. Flags default to "not given", so only what
the user types overrides the YAML (`overrides_from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from lbgen.config.io import strip_optional
from lbgen.config.schema import Config, field_comments, leaf_fields


def _parse_scalar(tp):
    inner, optional = strip_optional(tp)

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            return [item(s.strip()) for s in text.split(",") if s.strip()]
        return inner(text)

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


class _FlattenList(argparse.Action):
    """Store the items of a space- and/or comma-separated list flag as one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for value in values for item in value])


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...], top_level: bool = True) -> None:
    """One `--flag` per leaf field of `sections` (e.g. "model", "finetune") and, with `top_level`, of the top level.

    Flags default to "not given" so that only what the user types overrides the YAML.
    """
    seen: dict[str, tuple] = {}
    for path, f, tp in leaf_fields(Config):
        if (path[0] not in sections) if len(path) > 1 else not top_level:
            continue
        flag = "--" + path[-1].replace("_", "-")
        if flag in seen:
            raise AssertionError(f"flag {flag} is ambiguous: {seen[flag]} and {path}")
        seen[flag] = path
        inner, _ = strip_optional(tp)
        kwargs: dict[str, Any] = dict(dest="cfg:" + ".".join(path), default=argparse.SUPPRESS)
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is list:
            # `--data a b` and `--data a,b` both give ["a", "b"].
            kwargs.update(type=_parse_scalar(tp), nargs="+", action=_FlattenList, metavar=path[-1].upper())
        else:
            kwargs["type"] = _parse_scalar(tp)
            kwargs["metavar"] = path[-1].upper()
        parser.add_argument(flag, help=_flag_help(path, f), **kwargs)


def _default_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def _flag_help(path: tuple[str, ...], f: dataclasses.Field) -> str:
    """The field's comment, its config path and its default (the paper's; a preset may change it).

    The default is the section's own: `pretrain.cluster.cpus_per_worker` shows pretrain's 2.0.
    """
    owner, default = Config, Config()
    for name in path[:-1]:
        owner, default = typing.get_type_hints(owner)[name], getattr(default, name)
    comment = field_comments(owner).get(f.name, "")
    text = f"{comment} [{'.'.join(path)}; default: {_default_text(getattr(default, path[-1]))}]".strip()
    return text.replace("%", "%%")  # argparse formats help strings with %


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The nested override dict from the flags the user actually gave."""
    out: dict = {}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:"):
            continue
        *parents, leaf = dest[4:].split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
