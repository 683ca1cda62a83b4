"""Config files and dicts: YAML in and out, dict -> dataclass coercion, and the precedence
defaults <- preset <- YAML file <- overrides (`resolve`). The resolved config is saved beside
every output (`to_yaml`). Every refusal is one `ConfigError` line naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from lbgen.config.presets import PRESETS, RECIPES
from lbgen.config.schema import Config, validate
from lbgen.errors import ConfigError

# ---------------------------------------------------------------- dict <-> dataclass


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def strip_optional(tp):
    """`Optional[X]` -> (X, True); `X` -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    inner, optional = strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    if typing.get_origin(inner) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(inner)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if inner in (int, float, str, bool) and (type(value) is not inner):
        raise ConfigError(f"{where}: expected {inner.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from a nested dict, refusing unknown keys and wrong types.

    A nested section given in part keeps the section's own defaults for the rest
    (`finetune: {cluster: {workers: 8}}` keeps finetune's `checkpoint_every`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            f = fields[name]
            defaults = asdict(f.default_factory()) if f.default_factory is not dataclasses.MISSING else {}
            kwargs[name] = from_dict(tp, _merge(defaults, value) if isinstance(value, dict) else value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    return cls(**kwargs)


# ---------------------------------------------------------------- YAML and precedence


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at top level")
    return data


def resolve(preset: str | None = None, config_file: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults <- preset <- YAML file <- overrides (nested dicts), validated (see `resolve_with_preset`)."""
    return resolve_with_preset(preset, config_file, overrides)[0]


def resolve_with_preset(
    preset: str | None = None, config_file: str | Path | None = None, overrides: dict | None = None
) -> tuple[Config, str | None]:
    """Defaults <- preset <- recipe <- YAML file <- overrides (nested dicts), validated; and the preset that applied.

    The recipe (`pretrain.recipe`, `RECIPES`) is whichever the last layer names.

    A YAML file may name its preset (`preset: sd15-in1k`), so that a job file carries its whole
    setup; a `preset` given here wins over the file's. When neither names one, the dataclass
    defaults (the paper's settings) apply as they are: `tiny` only when asked for.
    """
    file_data = load_yaml(config_file) if config_file is not None else {}
    where = str(config_file) if config_file is not None else "config"
    preset = preset_name(preset, file_data, where)
    data = _merge(asdict(Config()), PRESETS[preset] if preset else {})
    recipe = named_recipe(data, file_data, overrides or {})
    recipe_fields = RECIPES.get(recipe, {}) if isinstance(recipe, str) else {}  # an unknown name: refused by validate
    data = _merge(_merge(data, {"pretrain": recipe_fields}), file_data)
    from_dict(Config, data, where)  # the file alone must be well-formed: a flag must not hide `generate: 3`
    data = _merge(data, overrides or {})
    return validate(from_dict(Config, data, where)), preset


def named_recipe(*layers: dict) -> str | None:
    """The `pretrain.recipe` the last of `layers` that names one gives."""
    named = [layer["pretrain"]["recipe"] for layer in layers if isinstance(layer.get("pretrain"), dict) and "recipe" in layer["pretrain"]]
    return named[-1] if named else None


def preset_name(preset: str | None, file_data: dict, where: str = "config") -> str | None:
    """The preset that applies: `preset`, else the config file's `preset:` key (popped), else none."""
    file_preset = file_data.pop("preset", None)
    preset = file_preset if preset is None else preset
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ConfigError(f"{where}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return preset


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
