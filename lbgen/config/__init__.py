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
import functools
import inspect
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lbgen.errors import ConfigError  # noqa: F401  (raised here; defined with the others)
from lbgen.runtime.precision import MIXED_PRECISION, WEIGHT_DTYPES


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
    # Ray accelerator type the workers need (e.g. "A100": cluster.yaml's training nodes); null: any GPU.
    accelerator_type: Optional[str] = None
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
    # CLIP text for L_in: each image against its own class's prompt.
    clip_template: str = "photo of {name}"
    # CLIP text for the discriminator's "real" side: the class names' own embeddings (the paper's f_c; the
    # authors embed bare names), apart from L_in's prompt.
    real_template: str = "{name}"
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
    # Draw the "real" text features from classes other than the image's own (the paper's "a different class").
    exclude_own_class: bool = True
    # Loss weights: L = w_en*L_en + w_in*L_in + lambda_q*L_q.
    w_en: float = 1.0
    w_in: float = 1.0
    lambda_q: float = 0.1
    # Mixed precision on any device (autocast; frozen weights in that dtype): "bf16", "fp16" (loss scaling) or "no" (fp32).
    mixed_precision: str = "bf16"
    # Recompute UNet activations in backward to save memory.
    gradient_checkpointing: bool = True
    # Save a resumable checkpoint every this many steps (and at the end).
    checkpoint_every: int = 50
    # Worker-group failures (a dead or failing worker) that Ray Train recovers from the last checkpoint; -1: no limit.
    max_failures: int = 3
    # Write a sample grid every this many steps (0: only before and after).
    sample_every: int = 200
    # Classes shown in the sample grids (the first rows of the table).
    sample_classes: int = 8


@dataclass
class PretrainConfig:
    """Stage 3, `pretrain`: a timm backbone trained on the generated shards (DESIGN 2.3).

    Defaults are a real-scale ImageNet recipe for one GPU worker (SGD, cosine with warm-up,
    label smoothing); `lr` is for the global batch (`batch_size` x `workers`).
    """

    # Shard directories (each holding `data/*.parquet` or `*.parquet`) or single shard files; local
    # paths or object-store URIs (s3://bucket/ds?endpoint_override=host:port&scheme=http, gs://...).
    data: list[str] = field(default_factory=list)
    # Output directory (local path only); re-running with the same one resumes.
    output: str = "runs/pretrain"
    # Any timm model name.
    model: str = "resnet50"
    # Passes over the training rows.
    epochs: int = 100
    # Images per worker per step.
    batch_size: int = 256
    # Peak learning rate (for the global batch), reached after the warm-up.
    lr: float = 0.1
    # Optimiser, any `timm.optim.create_optimizer_v2` name ("sgd" uses Nesterov momentum 0.9).
    opt: str = "sgd"
    # Weight decay (not applied to biases and norm layers).
    weight_decay: float = 1e-4
    # Linear warm-up from `warmup_lr`, in epochs (fractions allowed), then cosine to `min_lr`.
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    # Cross-entropy label smoothing.
    label_smoothing: float = 0.1
    # Training crop side in pixels (evaluation resizes to image_size / crop_pct, then centre-crops).
    image_size: int = 224
    crop_pct: float = 0.875
    # RandomResizedCrop area range and aspect-ratio range.
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    # Probability of a horizontal flip.
    hflip: float = 0.5
    # Normalisation applied on the training device (the loader ships uint8 pixels).
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Share of rows held out for accuracy, chosen by a hash of (seed, label, index): stable across runs.
    val_fraction: float = 0.01
    # Keep only rows whose CLIP score / IQA score reach these values (null: keep all).
    min_clip_score: Optional[float] = None
    min_iqa: Optional[float] = None
    # Keep only rows where CLIP's zero-shot prediction agrees with the label.
    require_clip_agrees: bool = False
    # Leave out unreadable or schema-wrong shards with a warning instead of failing.
    skip_bad_shards: bool = False
    # Rows per decode+augment call in Ray Data.
    decode_batch_size: int = 64
    # Rows per block read from a shard: small blocks let several CPUs decode before a shard is read whole.
    read_block_rows: int = 512
    # Rows in each worker's local shuffle buffer (Ray Data streams; there is no global shuffle).
    shuffle_buffer: int = 10000
    # Ray Train workers (DDP ranks).
    workers: int = 1
    # Train on GPUs; null picks GPUs when the Ray cluster has any.
    use_gpu: Optional[bool] = None
    # Ray accelerator type the workers need (e.g. "A100": cluster.yaml's training nodes); null: any GPU.
    accelerator_type: Optional[str] = None
    # CPUs reserved per worker; keep some free for Ray Data's decoding (a full reservation deadlocks it).
    cpus_per_worker: float = 2.0
    # Mixed precision on any device (autocast): "bf16", "fp16" (loss scaling) or "no" (fp32).
    mixed_precision: str = "bf16"
    # Save a resumable checkpoint every this many epochs (and at the end).
    checkpoint_every: int = 1
    # Worker-group failures (a dead or failing worker) that Ray Train recovers from the last checkpoint; -1: no limit.
    max_failures: int = 3


@dataclass
class EvaluateConfig:
    """Stage 4, `evaluate`: transfer of backbones to downstream classification sets (DESIGN 2.4)."""

    # Backbones to compare: a pretrain output dir (model.json), `random:<timm name>` or `timm:<timm name>`.
    backbone: list[str] = field(default_factory=list)
    # Downstream sets: ImageFolder dirs with train/ and val/ or test/, or dirs of Parquet (image, label) with the same splits.
    downstream: list[str] = field(default_factory=list)
    # ImageNet-9-style dirs (original/, mixed_same/, mixed_rand/) for the background gap; empty: skipped.
    bias: list[str] = field(default_factory=list)
    # "linear": frozen features + logistic regression; "finetune": full fine-tuning.
    protocol: str = "linear"
    # Shares of each downstream training set (stratified, seeded subsets).
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
    # Output directory: results.csv, results.md, accuracy_vs_fraction.png.
    output: str = "runs/evaluate"
    # Input side in pixels (resize to image_size / crop_pct, centre-crop); null: the backbone's own.
    eval_image_size: Optional[int] = None
    # Images per forward pass.
    eval_batch_size: int = 256
    # Share of each training subset held out to choose the regularisation (linear protocol).
    probe_val_fraction: float = 0.2
    # L2 penalties tried for the logistic regression (on standardised features).
    probe_l2: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    # L-BFGS iterations per fit.
    probe_max_iter: int = 200
    # Fine-tune protocol recipe: AdamW, cosine, label smoothing 0.1, RandomResizedCrop + flip.
    ft_epochs: int = 30
    ft_lr: float = 1e-3
    ft_weight_decay: float = 0.05
    ft_batch_size: int = 64
    # DataLoader processes per evaluation task.
    loader_workers: int = 4
    # Resources per (backbone, dataset) Ray task; null GPUs: one when the cluster has any.
    task_cpus: float = 4.0
    task_gpus: Optional[float] = None


@dataclass
class RunAllConfig:
    """`run`: every stage end to end into one directory (finetune/, generate/, downstream/, pretrain/, evaluate/)."""

    # Directory of the whole run; each stage writes its own subdirectory and skips itself when complete.
    output: str = "runs/lbgen"


@dataclass
class ReportConfig:
    """`report`: the run report (`report.html`, `report.md`) that `run` writes at its end."""

    # Images per class, a seeded choice, whose CLIP embeddings measure the dataset's per-class diversity.
    diversity_images: int = 32


@dataclass
class MakeDownstreamConfig:
    """`make-downstream`: a procedural downstream set, so evaluation runs without downloads."""

    # "shapes" (ImageFolder train/ + test/) or "shapes-in9" (original/ mixed_same/ mixed_rand/).
    kind: str = "shapes"
    # Where to write it.
    output: str = "runs/downstream/shapes"
    # Images per class in train/ and in test/.
    train_per_class: int = 100
    test_per_class: int = 50
    # Side of the images in pixels.
    size: int = 64


@dataclass
class GenerateConfig:
    """The `generate` stage (DESIGN 2.2): class table -> scored, resumable Parquet shards."""

    # Output dataset directory: a local path or an object-store URI (s3://bucket/ds, gs://..., file://...,
    # S3 endpoint in the query: ?endpoint_override=host:port&scheme=http); re-running with the same one resumes.
    output: str = "runs/generate"
    # Directory (local path or URI) holding a diffusers LoRA (`pytorch_lora_weights.safetensors`, e.g. from finetune), or null.
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
    # Rows handed to a generation actor per call (a Ray Data batch); does not change any image.
    batch_size: int = 8
    # Images per diffusion model call inside an actor. Every call is padded to exactly this many, so the
    # kernels see the same shapes whatever the batching, and an image's pixels never depend on its
    # neighbours (CPU and GPU kernels choose code paths by shape); part of what defines the dataset.
    micro_batch: int = 8
    # Generation actors (one model copy each; one per GPU on a cluster).
    workers: int = 1
    # CPUs reserved per generation actor; fractions leave CPUs for Ray Data's read/encode tasks.
    cpus_per_worker: float = 1.0
    # torch intra-op threads per actor on CPU; pixels are bitwise reproducible only at equal thread counts.
    threads: int = 1
    # Generate on GPUs; null picks GPUs when the Ray cluster has any.
    use_gpu: Optional[bool] = None
    # Weight dtype of the generation model on any device: "fp16", "bf16" or "fp32".
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
class FaultConfig:
    """TEST ONLY: kill one worker process hard, once, to prove a stage survives it (`lbgen.runtime.faults`).

    Off by default; set only in YAML or overrides (no command has flags for it). It travels
    inside the config to every Ray actor and train worker.
    """

    # Where to die: one of lbgen.runtime.faults.POINTS, or null (no fault).
    point: Optional[str] = None
    # Die on the `after`-th time one process reaches `point` (1: the first time).
    after: int = 1
    # File created by the dying process; while it exists the fault never fires again (restarted workers live).
    marker: str = ""


@dataclass
class Config:
    """Everything a run needs; stages read their own section."""

    # Class table: a shipped name ("imagenet1k", "tiny10") or a .txt/.csv/.parquet path.
    classes: str = "imagenet1k"
    # Run seed: every random choice derives from it.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    make_downstream: MakeDownstreamConfig = field(default_factory=MakeDownstreamConfig)
    run: RunAllConfig = field(default_factory=RunAllConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


# SD 1.5's UNet/VAE/text encoder and CLIP ViT-L/14 with random weights: the real workload's
# shapes (speed, memory) without a download. The IQA stays the tiny CNNIQA: pyiqa's NR metrics
# cannot be built without their weights.
SD15_SHAPE_MODELS = {"generator": "sd15-shape", "clip": "ViT-L-14", "clip_pretrained": None, "iqa": "tiny", "resolution": 512}

TINY_MODELS = {"generator": "tiny", "clip": "tiny", "clip_pretrained": None, "iqa": "tiny", "resolution": 64}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ImageNet-1K setup: SD 1.5, CLIP ViT-L/14 (OpenAI), 8 GPUs x batch 4.
    "sd15-in1k": {
        "finetune": {"workers": 8, "use_gpu": True},
        # 8 GPUs x 256 images: the linear scaling rule's lr 0.1 x 2048 / 256.
        "pretrain": {"workers": 8, "use_gpu": True, "lr": 0.8, "cpus_per_worker": 8.0},
    },
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
            "mixed_precision": "no",
        },
        "pretrain": {
            "output": "runs/tiny/pretrain",
            # timm's 0.4M-parameter test ResNet: learns the procedural shapes in seconds at 32 px on CPU.
            "model": "test_resnet",
            "epochs": 2,
            "batch_size": 32,
            "opt": "adamw",
            "lr": 3e-3,
            "weight_decay": 0.05,
            "warmup_epochs": 0.2,
            "image_size": 32,
            "crop_scale": [0.35, 1.0],
            "val_fraction": 0.1,
            "decode_batch_size": 32,
            "read_block_rows": 64,
            "shuffle_buffer": 256,
            "use_gpu": False,
            # Half a CPU: on a 2-CPU machine Ray Data needs the rest (ENVIRONMENT: Train + Data deadlock).
            "cpus_per_worker": 0.5,
            "mixed_precision": "no",
        },
        "evaluate": {
            "output": "runs/tiny/evaluate",
            "fractions": [0.1, 0.5, 1.0],
            "eval_image_size": 32,
            "eval_batch_size": 64,
            "probe_max_iter": 100,
            "ft_epochs": 3,
            "ft_lr": 1e-3,
            "ft_batch_size": 32,
            "loader_workers": 0,
            "task_cpus": 1.0,
            "task_gpus": 0.0,
        },
        "make_downstream": {"output": "runs/tiny/downstream/shapes", "train_per_class": 40, "test_per_class": 20, "size": 32},
        "run": {"output": "runs/tiny"},
        "generate": {
            "output": "runs/tiny/generate",
            "use_gpu": False,
            "images_per_class": 8,
            "steps": 4,
            "batch_size": 4,
            "micro_batch": 4,
            "dtype": "fp32",
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
    if inner is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
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
    _validate_finetune(cfg.finetune, cfg.model)
    _validate_generate(cfg.generate)
    _validate_pretrain(cfg.pretrain)
    _validate_evaluate(cfg.evaluate)
    _validate_make_downstream(cfg.make_downstream)
    _require({"report.diversity_images": (cfg.report.diversity_images >= 2, f"must be >= 2 (pairs of images), got {cfg.report.diversity_images}")})
    _validate_fault(cfg.fault)
    return cfg


# Locations that may be object-store URIs (lbgen.data.storage).
URI_FIELDS = ("generate.output", "generate.lora", "pretrain.data")
# Per stage, the locations it still reads or writes through the local file system only.
LOCAL_FIELDS = {
    "finetune": ("output",), "pretrain": ("output",), "evaluate": ("output", "backbone", "downstream", "bias"),
    "run": ("output",), "make_downstream": ("output",),
}


def require_local(cfg: Config, stage: str) -> None:
    """Refuse an object-store URI where `stage` reads or writes through the local file system only
    (it would become a local directory named `s3:`). Checked when the stage starts, not when a config
    resolves: one config file may hold every stage's settings."""
    from lbgen.data.storage import is_uri

    accepted = ", ".join(URI_FIELDS) + " and `lbgen inspect`"
    for name in LOCAL_FIELDS[stage]:
        value = getattr(getattr(cfg, stage), name)
        uri = next((v for v in (value if isinstance(value, list) else [value]) if is_uri(v)), None)
        _require({f"{stage}.{name}": (uri is None, f"must be a local path, got {uri!r} (object-store URIs work for {accepted})")})


def _positive(fields: dict[str, float]) -> dict[str, tuple[bool, str]]:
    return {name: (value > 0, f"must be > 0, got {value}") for name, value in fields.items()}


def _non_negative(fields: dict[str, float]) -> dict[str, tuple[bool, str]]:
    return {name: (value >= 0, f"must be >= 0, got {value}") for name, value in fields.items()}


NAME_PROBE = "\0lbgen-name\0"


def _fills_name(template: str) -> bool:
    """`template.format(name=...)` works and puts the name in (other braces must be doubled: `{{`)."""
    try:
        return NAME_PROBE in template.format(name=NAME_PROBE)
    except (KeyError, IndexError, ValueError, AttributeError):
        return False


def _has_name_slot(section: str, obj, names: tuple[str, ...]) -> dict[str, tuple[bool, str]]:
    return {f"{section}.{n}": (_fills_name(getattr(obj, n)), f"must contain '{{name}}' and no other {{...}} field, got {getattr(obj, n)!r}")
            for n in names}


def _validate_finetune(ft: FinetuneConfig, model: ModelConfig) -> None:
    _require({
        **_positive({
            "finetune.workers": ft.workers,
            "finetune.batch_size": ft.batch_size,
            "finetune.num_steps": ft.num_steps,
            "finetune.lora_rank": ft.lora_rank,
            "finetune.d_hidden": ft.d_hidden,
            "finetune.checkpoint_every": ft.checkpoint_every,
            "finetune.cpus_per_worker": ft.cpus_per_worker,
            "finetune.epochs": ft.epochs,
            "model.resolution": model.resolution,
        }),
        "finetune.grad_steps": (
            0 < ft.grad_steps <= ft.num_steps,
            f"must be > 0 and must not exceed finetune.num_steps ({ft.num_steps}), got {ft.grad_steps}",
        ),
        **_non_negative({
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
        }),
        "finetune.max_failures": (ft.max_failures >= -1, f"must be >= 0 or -1 (no limit), got {ft.max_failures}"),
        "finetune.max_steps": (ft.max_steps is None or ft.max_steps > 0, f"must be > 0 or null, got {ft.max_steps}"),
        "finetune.mixed_precision": _one_of(ft.mixed_precision, MIXED_PRECISION),
        **_has_name_slot("finetune", ft, ("prompt_template", "clip_template", "real_template")),
    })


def _one_of(value: str, names) -> tuple[bool, str]:
    return value in names, f"must be one of {', '.join(names)}, got {value!r}"


def _require(checks: dict[str, tuple[bool, str]]) -> None:
    """Raise for the first failed (ok, requirement) pair; keys are field paths."""
    for name, (ok, requirement) in checks.items():
        if not ok:
            raise ConfigError(f"{name} {requirement}")


def _in_unit(values: list[float], low_open: bool = False) -> bool:
    return all((0 < v if low_open else 0 <= v) and v <= 1 for v in values)


def _validate_pretrain(pt: PretrainConfig) -> None:
    _require({
        "pretrain.model": (bool(pt.model.strip()), "must name a timm model"),
        "pretrain.epochs": (pt.epochs > 0, f"must be > 0, got {pt.epochs}"),
        "pretrain.batch_size": (pt.batch_size > 0, f"must be > 0, got {pt.batch_size}"),
        "pretrain.lr": (pt.lr > 0, f"must be > 0, got {pt.lr}"),
        "pretrain.weight_decay": (pt.weight_decay >= 0, f"must be >= 0, got {pt.weight_decay}"),
        "pretrain.warmup_epochs": (0 <= pt.warmup_epochs < pt.epochs, f"must be in [0, epochs={pt.epochs}), got {pt.warmup_epochs}"),
        "pretrain.min_lr": (0 <= pt.min_lr <= pt.lr, f"must be in [0, lr], got {pt.min_lr}"),
        "pretrain.warmup_lr": (0 <= pt.warmup_lr <= pt.lr, f"must be in [0, lr], got {pt.warmup_lr}"),
        "pretrain.label_smoothing": (0 <= pt.label_smoothing < 1, f"must be in [0, 1), got {pt.label_smoothing}"),
        "pretrain.image_size": (pt.image_size >= 8, f"must be >= 8, got {pt.image_size}"),
        "pretrain.crop_pct": (0 < pt.crop_pct <= 1, f"must be in (0, 1], got {pt.crop_pct}"),
        "pretrain.crop_scale": (len(pt.crop_scale) == 2 and 0 < pt.crop_scale[0] <= pt.crop_scale[1] <= 1, f"must be [min, max] with 0 < min <= max <= 1, got {pt.crop_scale}"),
        "pretrain.crop_ratio": (len(pt.crop_ratio) == 2 and 0 < pt.crop_ratio[0] <= pt.crop_ratio[1], f"must be [min, max] with 0 < min <= max, got {pt.crop_ratio}"),
        "pretrain.hflip": (0 <= pt.hflip <= 1, f"must be in [0, 1], got {pt.hflip}"),
        "pretrain.mean": (len(pt.mean) == 3, f"must have 3 values, got {pt.mean}"),
        "pretrain.std": (len(pt.std) == 3 and all(v > 0 for v in pt.std), f"must have 3 values > 0, got {pt.std}"),
        "pretrain.val_fraction": (0 <= pt.val_fraction < 1, f"must be in [0, 1), got {pt.val_fraction}"),
        "pretrain.decode_batch_size": (pt.decode_batch_size > 0, f"must be > 0, got {pt.decode_batch_size}"),
        "pretrain.read_block_rows": (pt.read_block_rows > 0, f"must be > 0, got {pt.read_block_rows}"),
        "pretrain.shuffle_buffer": (pt.shuffle_buffer >= 0, f"must be >= 0, got {pt.shuffle_buffer}"),
        "pretrain.workers": (pt.workers > 0, f"must be > 0, got {pt.workers}"),
        "pretrain.cpus_per_worker": (pt.cpus_per_worker > 0, f"must be > 0, got {pt.cpus_per_worker}"),
        "pretrain.mixed_precision": _one_of(pt.mixed_precision, MIXED_PRECISION),
        "pretrain.checkpoint_every": (pt.checkpoint_every > 0, f"must be > 0, got {pt.checkpoint_every}"),
        "pretrain.max_failures": (pt.max_failures >= -1, f"must be >= 0 or -1 (no limit), got {pt.max_failures}"),
    })


def _validate_fault(fault: FaultConfig) -> None:
    from lbgen.runtime.faults import POINTS

    if fault.point is None:
        return
    _require({
        "fault.point": (fault.point in POINTS, f"must be one of {', '.join(POINTS)} or null, got {fault.point!r}"),
        "fault.after": (fault.after > 0, f"must be > 0, got {fault.after}"),
        "fault.marker": (bool(fault.marker), "must name the marker file when fault.point is set"),
    })


def _validate_evaluate(ev: EvaluateConfig) -> None:
    _require({
        "evaluate.protocol": (ev.protocol in ("linear", "finetune"), f"must be linear or finetune, got {ev.protocol!r}"),
        "evaluate.fractions": (bool(ev.fractions) and _in_unit(ev.fractions, low_open=True), f"must be values in (0, 1], got {ev.fractions}"),
        "evaluate.eval_image_size": (ev.eval_image_size is None or ev.eval_image_size >= 8, f"must be >= 8 or null, got {ev.eval_image_size}"),
        "evaluate.eval_batch_size": (ev.eval_batch_size > 0, f"must be > 0, got {ev.eval_batch_size}"),
        "evaluate.probe_val_fraction": (0 < ev.probe_val_fraction < 1, f"must be in (0, 1), got {ev.probe_val_fraction}"),
        "evaluate.probe_l2": (bool(ev.probe_l2) and all(v >= 0 for v in ev.probe_l2), f"must be values >= 0, got {ev.probe_l2}"),
        "evaluate.probe_max_iter": (ev.probe_max_iter > 0, f"must be > 0, got {ev.probe_max_iter}"),
        "evaluate.ft_epochs": (ev.ft_epochs > 0, f"must be > 0, got {ev.ft_epochs}"),
        "evaluate.ft_lr": (ev.ft_lr > 0, f"must be > 0, got {ev.ft_lr}"),
        "evaluate.ft_weight_decay": (ev.ft_weight_decay >= 0, f"must be >= 0, got {ev.ft_weight_decay}"),
        "evaluate.ft_batch_size": (ev.ft_batch_size > 0, f"must be > 0, got {ev.ft_batch_size}"),
        "evaluate.loader_workers": (ev.loader_workers >= 0, f"must be >= 0, got {ev.loader_workers}"),
        "evaluate.task_cpus": (ev.task_cpus > 0, f"must be > 0, got {ev.task_cpus}"),
        "evaluate.task_gpus": (ev.task_gpus is None or ev.task_gpus >= 0, f"must be >= 0 or null, got {ev.task_gpus}"),
    })


def _validate_make_downstream(md: MakeDownstreamConfig) -> None:
    _require({
        "make_downstream.kind": (md.kind in ("shapes", "shapes-in9"), f"must be shapes or shapes-in9, got {md.kind!r}"),
        "make_downstream.train_per_class": (md.train_per_class >= 2, f"must be >= 2, got {md.train_per_class}"),
        "make_downstream.test_per_class": (md.test_per_class >= 1, f"must be >= 1, got {md.test_per_class}"),
        "make_downstream.size": (md.size >= 16, f"must be >= 16, got {md.size}"),
    })


IMAGE_FORMATS = ("jpeg", "png", "webp")


def _validate_generate(gen: GenerateConfig) -> None:
    _require({
        **_positive({
            "generate.images_per_class": gen.images_per_class,
            "generate.steps": gen.steps,
            "generate.batch_size": gen.batch_size,
            "generate.micro_batch": gen.micro_batch,
            "generate.workers": gen.workers,
            "generate.cpus_per_worker": gen.cpus_per_worker,
            "generate.threads": gen.threads,
            "generate.rows_per_shard": gen.rows_per_shard,
            "generate.row_group_rows": gen.row_group_rows,
        }),
        **_non_negative({"generate.guidance": gen.guidance}),
        "generate.image_format": (gen.image_format in IMAGE_FORMATS, f"must be one of {', '.join(IMAGE_FORMATS)}, got {gen.image_format!r}"),
        "generate.image_quality": (1 <= gen.image_quality <= 100, f"must be in 1..100, got {gen.image_quality}"),
        "generate.dtype": _one_of(gen.dtype, WEIGHT_DTYPES),
        **_has_name_slot("generate", gen, ("prompt_template", "score_template")),
    })


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
    """Defaults <- preset <- YAML file <- overrides (nested dicts), validated; and the preset that applied.

    A YAML file may name its preset (`preset: sd15-in1k`), so that a job file carries its whole
    setup; a `preset` given here wins over the file's. When neither names one, the dataclass
    defaults (the paper's settings) apply as they are: `tiny` only when asked for.
    """
    file_data = load_yaml(config_file) if config_file is not None else {}
    where = str(config_file) if config_file is not None else "config"
    preset = preset_name(preset, file_data, where)
    data = _merge(_merge(asdict(Config()), PRESETS[preset] if preset else {}), file_data)
    from_dict(Config, data, where)  # the file alone must be well-formed: a flag must not hide `generate: 3`
    data = _merge(data, overrides or {})
    return validate(from_dict(Config, data, where)), preset


def preset_name(preset: str | None, file_data: dict, where: str = "config") -> str | None:
    """The preset that applies: `preset`, else the config file's `preset:` key (popped), else none."""
    file_preset = file_data.pop("preset", None)
    preset = file_preset if preset is None else preset
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ConfigError(f"{where}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return preset


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
    for path, f, tp in _leaf_fields(Config):
        if (path[0] not in sections) if len(path) > 1 else not top_level:
            continue
        flag = "--" + path[-1].replace("_", "-")
        if flag in seen:
            raise AssertionError(f"flag {flag} is ambiguous: {seen[flag]} and {path}")
        seen[flag] = path
        inner, _ = _strip_optional(tp)
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


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """Each field's explanation: the comment lines above it in `cls`'s source.

    Fields listed right under another without a comment of their own share its comment
    (`lora_rank` and `lora_alpha` under "LoRA on the UNet attention projections.").
    """
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    pending: list[str] = []
    shared = ""
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        name = text.split(":", 1)[0].strip()
        if text.startswith("#"):
            pending.append(text.lstrip("#").strip())
        elif ":" in text and name in names:
            shared = " ".join(pending) if pending else shared
            comments[name], pending = shared, []
        elif not text:
            pending, shared = [], ""
    return comments


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def _flag_help(path: tuple[str, ...], f: dataclasses.Field) -> str:
    """The field's comment, its config path and its default (the paper's; a preset may change it)."""
    owner = Config if len(path) == 1 else typing.get_type_hints(Config)[path[0]]
    comment = field_comments(owner).get(f.name, "")
    text = f"{comment} [{'.'.join(path)}; default: {_default_text(f)}]".strip()
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
