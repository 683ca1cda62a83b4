"""Typed configuration: the schema, presets, and config files (YAML, dicts, precedence).

Defaults live in one place, the dataclass fields of `lbgen.config.schema`, and they are the
paper's method (DESIGN 1). A preset (`lbgen.config.presets`) is a nested dict of overrides on
top of them; a YAML file overrides the preset; CLI flags (`lbgen.cli.flags`) override the YAML
(`lbgen.config.io`). The resolved config is saved beside every output (`config.yaml`).

    schema   the section dataclasses, each field's comment, default and check; resumable fields
    presets  PRESETS (tiny, sd15-shape, sd15-in1k)
    io       YAML, dict -> dataclass coercion, resolve (defaults <- preset <- file <- overrides)
    choices  the names a setting may take (precisions, formats, protocols, ...), which implementations import
    paths    which locations may be object-store URIs, which must be local; `require_local`, checked when a stage starts
"""

from __future__ import annotations

from lbgen.config.io import from_dict, load_yaml, preset_name, resolve, resolve_with_preset, to_yaml
from lbgen.config.paths import LOCAL_FIELDS, URI_FIELDS, is_uri, require_local
from lbgen.config.presets import PRESETS, SD15_SHAPE_MODELS, TINY_MODELS
from lbgen.config.schema import (
    Config,
    EvaluateConfig,
    FaultConfig,
    FinetuneConfig,
    GenerateConfig,
    MakeDownstreamConfig,
    ModelConfig,
    PretrainConfig,
    ReportConfig,
    RunAllConfig,
    TrainCluster,
    field_comments,
    leaf_fields,
    resumable_fields,
    validate,
)
from lbgen.errors import ConfigError

__all__ = [
    "LOCAL_FIELDS", "PRESETS", "SD15_SHAPE_MODELS", "TINY_MODELS", "URI_FIELDS",
    "Config", "ConfigError", "EvaluateConfig", "FaultConfig", "FinetuneConfig", "GenerateConfig", "MakeDownstreamConfig",
    "ModelConfig", "PretrainConfig", "ReportConfig", "RunAllConfig", "TrainCluster",
    "field_comments", "from_dict", "is_uri", "leaf_fields", "load_yaml", "preset_name", "require_local", "resolve",
    "resolve_with_preset", "resumable_fields", "to_yaml", "validate",
]
