"""Typed configuration: dataclasses, presets, YAML files and CLI overrides.

Defaults live in one place, the dataclass fields below, and they are the paper's
method (DESIGN 1). A preset is a nested dict of overrides on top of them; a YAML
file overrides the preset; CLI flags override the YAML. The resolved config is
saved beside every output (`config.yaml`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names which."""


@dataclass
class ModelConfig:
    """Which models the stages load. Each takes a hub id, a local path, or `tiny`."""

    # Diffusers Stable Diffusion pipeline: hub id, local directory, or "tiny".
    generator: str = "sd-legacy/stable-diffusion-v1-5"
    # open_clip architecture name (e.g. "ViT-L-14"), or "tiny".
    clip: str = "ViT-L-14"
    # open_clip pretrained tag ("openai"), a local weights file, or null for random init.
    clip_pretrained: Optional[str] = "openai"
    # pyiqa no-reference metric used as the quality loss, or "tiny".
    iqa: str = "topiq_nr"
    # Side of the square generated image, in pixels.
    resolution: int = 512
    # Allow models whose loading runs code from the hub (e.g. pyiqa's qalign). Off by default.
    trust_remote_code: bool = False


@dataclass
class FinetuneConfig:
    """The lbGen fine-tuning stage (DESIGN 1, steps 1-7)."""

    # Output directory (local path); re-running with the same one resumes.
    output: str = "runs/finetune"
    # Ray Train workers (DDP ranks).
    workers: int = 1
    # Train on GPUs; null picks GPUs when the Ray cluster has any.
    use_gpu: Optional[bool] = None
    # CPUs reserved per worker (fractions leave room for other Ray work).
    cpus_per_worker: float = 1.0
    # Classes per worker per step (B).
    batch_size: int = 4
    # Total optimiser steps; null derives them from `epochs` over the class table.
    max_steps: Optional[int] = None
    # Passes over the class table when `max_steps` is null.
    epochs: float = 3.0
    # Denoising steps per sample (T).
    num_steps: int = 50
    # Steps that record a graph (K), spaced T//K apart from a random start.
    grad_steps: int = 5
    # Classifier-free guidance scale (negative prompt = empty prompt).
    guidance: float = 2.0
    # Generator prompt for a class.
    prompt_template: str = "{name}"
    # CLIP text for L_in and for the discriminator's "real" side.
    clip_template: str = "photo of {name}"
    # LoRA on the UNet attention projections.
    lora_rank: int = 128
    lora_alpha: int = 128
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # Generator optimiser (AdamW, constant LR).
    lr: float = 2e-5
    weight_decay: float = 1e-2
    grad_clip: float = 0.1
    # Discriminator: MLP width and optimiser (AdamW, betas (0, 0.999)).
    d_hidden: int = 256
    d_lr: float = 1e-5
    d_grad_clip: float = 1.0
    # Passes over the class table that warm D up on frozen-generator images.
    d_warmup_passes: int = 1
    # Draw the "real" text features from classes other than the image's own.
    exclude_own_class: bool = False
    # Loss weights: L = w_en*L_en + w_in*L_in + lambda_q*L_q.
    w_en: float = 1.0
    w_in: float = 1.0
    lambda_q: float = 0.1
    # Mixed precision on GPU: "bf16", "fp16" or "no" (CPU always runs fp32).
    mixed_precision: str = "bf16"
    # Recompute UNet activations in backward to save memory.
    gradient_checkpointing: bool = True
    # Save a resumable checkpoint every this many steps (and at the end).
    checkpoint_every: int = 50
    # Write a sample grid every this many steps (0: only before and after).
    sample_every: int = 200
    # Classes shown in the sample grids (the first rows of the table).
    sample_classes: int = 8


@dataclass
class GenerateConfig:
    """The `generate` stage (DESIGN 2.2): class table -> scored, resumable Parquet shards."""

    # Output dataset directory (local path); re-running with the same one resumes.
    output: str = "runs/generate"
    # Directory holding a diffusers LoRA (`pytorch_lora_weights.safetensors`, e.g. from finetune), or null.
    lora: Optional[str] = None
    # Images per class (N); the paper's ImageNet-1K setup makes 1300.
    images_per_class: int = 1300
    # Denoising steps per image.
    steps: int = 50
    # Sampler: a key of lbgen.models.generator.SCHEDULERS (the paper trains and generates with DDPM).
    scheduler: str = "ddpm"
    # Classifier-free guidance scale (negative prompt = empty prompt).
    guidance: float = 2.0
    # Generator prompt for a class.
    prompt_template: str = "{name}"
    # CLIP text that `clip_score` and `clip_agrees` compare each image with.
    score_template: str = "photo of {name}"
    # Images per generation call on one actor (does not change any image).
    batch_size: int = 8
    # Generation actors (one model copy each; one per GPU on a cluster).
    workers: int = 1
    # CPUs reserved per generation actor; fractions leave CPUs for Ray Data's read/encode tasks.
    cpus_per_worker: float = 1.0
    # torch intra-op threads per actor on CPU; pixels are bitwise reproducible only at equal thread counts.
    threads: int = 1
    # Generate on GPUs; null picks GPUs when the Ray cluster has any.
    use_gpu: Optional[bool] = None
    # Weight dtype on GPU: "fp16", "bf16" or "fp32" (CPU always runs fp32).
    dtype: str = "fp16"
    # Stored image encoding: "jpeg", "png" or "webp".
    image_format: str = "jpeg"
    # Encoder quality for jpeg/webp (ignored for png).
    image_quality: int = 95
    # Rows per Parquet shard (shards are whole units of resume).
    rows_per_shard: int = 1000
    # Rows per Parquet row group (small groups keep image viewers responsive).
    row_group_rows: int = 100
    # Replace a dataset in `output` made with other settings instead of refusing.
    overwrite: bool = False


@dataclass
class Config:
    """Everything a run needs; stages read their own section."""

    # Class table: a shipped name ("imagenet1k", "tiny10") or a .txt/.csv/.parquet path.
    classes: str = "imagenet1k"
    # Run seed: every random choice derives from it.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# SD 1.5's UNet/VAE/text encoder and CLIP ViT-L/14 with random weights: the real workload's
# shapes (speed, memory) without a download. The IQA stays the tiny CNNIQA: pyiqa's NR metrics
# cannot be built without their weights.
SD15_SHAPE_MODELS = {"generator": "sd15-shape", "clip": "ViT-L-14", "clip_pretrained": None, "iqa": "tiny", "resolution": 512}

TINY_MODELS = {"generator": "tiny", "clip": "tiny", "clip_pretrained": None, "iqa": "tiny", "resolution": 64}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ImageNet-1K setup: SD 1.5, CLIP ViT-L/14 (OpenAI), 8 GPUs x batch 4.
    "sd15-in1k": {"finetune": {"workers": 8, "use_gpu": True}},
    # Seeded random small models, 10 classes: the whole machinery on 2 CPU cores in minutes.
    "tiny": {
        "classes": "tiny10",
        "model": TINY_MODELS,
        "finetune": {
            "output": "runs/tiny/finetune",
            "use_gpu": False,
            "batch_size": 4,
            "max_steps": 20,
            "num_steps": 10,
            "grad_steps": 2,
            "lora_rank": 4,
            "lora_alpha": 4,
            "lr": 1e-3,
            "d_hidden": 32,
            "d_lr": 1e-3,
            "checkpoint_every": 5,
            "sample_every": 10,
        },
        "generate": {
            "output": "runs/tiny/generate",
            "use_gpu": False,
            "images_per_class": 8,
            "steps": 4,
            "batch_size": 4,
            "cpus_per_worker": 0.5,
            "image_format": "png",
            "rows_per_shard": 20,
            "row_group_rows": 10,
        },
    },
    # The real SD 1.5 / CLIP ViT-L/14 architectures, random weights: figures of the real workload.
    "sd15-shape": {
        "classes": "tiny10",
        "model": SD15_SHAPE_MODELS,
        "finetune": {"output": "runs/sd15-shape/finetune", "max_steps": 2},
        "generate": {"output": "runs/sd15-shape/generate", "images_per_class": 8},
    },
}


# ---------------------------------------------------------------- dict <-> dataclass


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _strip_optional(tp):
    """`Optional[X]` -> (X, True); `X` -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    inner, optional = _strip_optional(tp)
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
    if inner in (int, float, str, bool) and (type(value) is not inner):
        raise ConfigError(f"{where}: expected {inner.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Refuse values the stages cannot run with; the message names the field."""
    ft = cfg.finetune
    positive = {
        "finetune.workers": ft.workers,
        "finetune.batch_size": ft.batch_size,
        "finetune.num_steps": ft.num_steps,
        "finetune.grad_steps": ft.grad_steps,
        "finetune.lora_rank": ft.lora_rank,
        "finetune.d_hidden": ft.d_hidden,
        "finetune.checkpoint_every": ft.checkpoint_every,
        "finetune.cpus_per_worker": ft.cpus_per_worker,
        "finetune.epochs": ft.epochs,
        "model.resolution": cfg.model.resolution,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    non_negative = {
        "finetune.lr": ft.lr,
        "finetune.d_lr": ft.d_lr,
        "finetune.w_en": ft.w_en,
        "finetune.w_in": ft.w_in,
        "finetune.lambda_q": ft.lambda_q,
        "finetune.weight_decay": ft.weight_decay,
        "finetune.grad_clip": ft.grad_clip,
        "finetune.d_grad_clip": ft.d_grad_clip,
        "finetune.d_warmup_passes": ft.d_warmup_passes,
        "finetune.sample_every": ft.sample_every,
        "finetune.sample_classes": ft.sample_classes,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    _validate_generate(cfg.generate)
    if ft.max_steps is not None and ft.max_steps <= 0:
        raise ConfigError(f"finetune.max_steps must be > 0 or null, got {ft.max_steps}")
    if ft.grad_steps > ft.num_steps:
        raise ConfigError(f"finetune.grad_steps ({ft.grad_steps}) must not exceed finetune.num_steps ({ft.num_steps})")
    if ft.mixed_precision not in ("bf16", "fp16", "no"):
        raise ConfigError(f"finetune.mixed_precision must be bf16, fp16 or no, got {ft.mixed_precision!r}")
    for name in ("prompt_template", "clip_template"):
        if "{name}" not in getattr(ft, name):
            raise ConfigError(f"finetune.{name} must contain '{{name}}', got {getattr(ft, name)!r}")
    return cfg


IMAGE_FORMATS = ("jpeg", "png", "webp")


def _validate_generate(gen: GenerateConfig) -> None:
    positive = {
        "generate.images_per_class": gen.images_per_class,
        "generate.steps": gen.steps,
        "generate.batch_size": gen.batch_size,
        "generate.workers": gen.workers,
        "generate.cpus_per_worker": gen.cpus_per_worker,
        "generate.threads": gen.threads,
        "generate.rows_per_shard": gen.rows_per_shard,
        "generate.row_group_rows": gen.row_group_rows,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    if gen.guidance < 0:
        raise ConfigError(f"generate.guidance must be >= 0, got {gen.guidance}")
    if gen.image_format not in IMAGE_FORMATS:
        raise ConfigError(f"generate.image_format must be one of {', '.join(IMAGE_FORMATS)}, got {gen.image_format!r}")
    if not 1 <= gen.image_quality <= 100:
        raise ConfigError(f"generate.image_quality must be in 1..100, got {gen.image_quality}")
    if gen.dtype not in ("fp16", "bf16", "fp32"):
        raise ConfigError(f"generate.dtype must be fp16, bf16 or fp32, got {gen.dtype!r}")
    for name in ("prompt_template", "score_template"):
        if "{name}" not in getattr(gen, name):
            raise ConfigError(f"generate.{name} must contain '{{name}}', got {getattr(gen, name)!r}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at top level")
    return data


def resolve(preset: str = "tiny", config_file: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults <- preset <- YAML file <- overrides (nested dicts), validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    data = _merge(asdict(Config()), PRESETS[preset])
    where = "config"
    if config_file is not None:
        data = _merge(data, load_yaml(config_file))
        where = str(config_file)
    data = _merge(data, overrides or {})
    return validate(from_dict(Config, data, where))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)


# ---------------------------------------------------------------- CLI flags


def _leaf_fields(cls, prefix: tuple[str, ...] = ()):
    """(path, field, type) for every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, tp


def _parse_scalar(tp):
    inner, optional = _strip_optional(tp)

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if typing.get_origin(inner) is list:
            return [s.strip() for s in text.split(",") if s.strip()]
        return inner(text)

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """One `--flag` per leaf field of the top level and of `sections` (e.g. "model", "finetune").

    Flags default to "not given" so that only what the user types overrides the YAML.
    """
    seen: dict[str, tuple] = {}
    for path, f, tp in _leaf_fields(Config):
        if len(path) > 1 and path[0] not in sections:
            continue
        flag = "--" + path[-1].replace("_", "-")
        if flag in seen:
            raise AssertionError(f"flag {flag} is ambiguous: {seen[flag]} and {path}")
        seen[flag] = path
        inner, _ = _strip_optional(tp)
        kwargs: dict[str, Any] = dict(dest="cfg:" + ".".join(path), default=argparse.SUPPRESS)
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_scalar(tp)
            kwargs["metavar"] = path[-1].upper()
        parser.add_argument(flag, help=f"override {'.'.join(path)}", **kwargs)


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
