"""The config schema: one dataclass per section, each field with its comment, its default and its check.

Defaults are the paper's method (DESIGN 1). Each section's `check(where)` sits right under its
fields and raises `ConfigError` naming the field (`finetune.lr must be >= 0, got -1`). Field
metadata marks the settings a run may change when it resumes (`resumable_fields`), and the comment
above each field is its documentation (`field_comments`, shown by `lbgen <stage> --help`).
Name sets come from `lbgen.config.choices`, which the implementations of the names import: config
imports nothing above itself.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass, field
from typing import Optional

from lbgen.config.presets import RECIPES
from lbgen.config.choices import COMPILE_MODES, DECODE_DEVICES, DOWNSTREAM_KINDS, FAST_PATHS, FAULT_POINTS, IMAGE_FORMATS, MIXED_PRECISION, PROTOCOLS, WEIGHT_DTYPES
from lbgen.errors import ConfigError

# Field metadata of a setting that may change between the runs of one output (resume keeps going).
RESUMABLE = {"resumable": True}


def resumable(default=dataclasses.MISSING, **kwargs):
    """A field that a resumed run may change (`resumable_fields`)."""
    return field(default=default, metadata=RESUMABLE, **kwargs)


# ---------------------------------------------------------------- checks shared by the sections


def _require(checks: dict[str, tuple[bool, str]]) -> None:
    """Raise for the first failed (ok, requirement) pair; keys are field paths."""
    for name, (ok, requirement) in checks.items():
        if not ok:
            raise ConfigError(f"{name} {requirement}")


def _positive(where: str, obj, names: tuple[str, ...]) -> dict[str, tuple[bool, str]]:
    return {f"{where}.{n}": (getattr(obj, n) > 0, f"must be > 0, got {getattr(obj, n)}") for n in names}


def _non_negative(where: str, obj, names: tuple[str, ...]) -> dict[str, tuple[bool, str]]:
    return {f"{where}.{n}": (getattr(obj, n) >= 0, f"must be >= 0, got {getattr(obj, n)}") for n in names}


def _one_of(value: str, names) -> tuple[bool, str]:
    return value in names, f"must be one of {', '.join(names)}, got {value!r}"


def _in_unit(values: list[float], low_open: bool = False) -> bool:
    return all((0 < v if low_open else 0 <= v) and v <= 1 for v in values)


NAME_PROBE = "\0lbgen-name\0"


def _fills_name(template: str) -> bool:
    """`template.format(name=...)` works and puts the name in (other braces must be doubled: `{{`)."""
    try:
        return NAME_PROBE in template.format(name=NAME_PROBE)
    except (KeyError, IndexError, ValueError, AttributeError):
        return False


def _has_name_slot(where: str, obj, names: tuple[str, ...]) -> dict[str, tuple[bool, str]]:
    return {f"{where}.{n}": (_fills_name(getattr(obj, n)), f"must contain '{{name}}' and no other {{...}} field, got {getattr(obj, n)!r}")
            for n in names}


# ---------------------------------------------------------------- sections


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

    def check(self, where: str = "model") -> None:
        _require(_positive(where, self, ("resolution",)))


@dataclass
class TrainCluster:
    """The Ray Train side of a training stage (finetune, pretrain): workers, resources, precision, checkpoints."""

    # Ray Train workers (DDP ranks).
    workers: int = resumable(1)
    # Train on GPUs; null picks GPUs when the Ray cluster has any.
    use_gpu: Optional[bool] = resumable(None)
    # Ray accelerator type the workers need (e.g. "A100": cluster.yaml's training nodes); null: any GPU.
    accelerator_type: Optional[str] = resumable(None)
    # CPUs reserved per worker (fractions leave room for other Ray work); pretrain keeps some free for
    # Ray Data's decoding (a full reservation deadlocks it).
    cpus_per_worker: float = resumable(1.0)
    # Mixed precision on any device (autocast; fine-tuning also keeps its frozen weights in that dtype):
    # "bf16", "fp16" (loss scaling) or "no" (fp32).
    mixed_precision: str = "bf16"
    # Save a resumable checkpoint every this many steps (finetune) or epochs (pretrain), and at the end.
    checkpoint_every: int = resumable(1)
    # Worker-group failures (a dead or failing worker) that Ray Train recovers from the last checkpoint; -1: no limit.
    max_failures: int = resumable(3)

    def check(self, where: str) -> None:
        _require({
            **_positive(where, self, ("workers", "cpus_per_worker")),
            f"{where}.mixed_precision": _one_of(self.mixed_precision, MIXED_PRECISION),
            **_positive(where, self, ("checkpoint_every",)),
            f"{where}.max_failures": (self.max_failures >= -1, f"must be >= 0 or -1 (no limit), got {self.max_failures}"),
        })


@dataclass
class FinetuneConfig:
    """The lbGen fine-tuning stage (DESIGN 1, steps 1-7)."""

    # Output directory (local path); re-running with the same one resumes.
    output: str = resumable("runs/finetune")
    # Ray Train workers, their resources, precision and checkpoints (flags --workers, --use-gpu, ...).
    cluster: TrainCluster = field(default_factory=functools.partial(TrainCluster, cpus_per_worker=1.0, checkpoint_every=50))
    # Classes per worker per step (B).
    batch_size: int = 4
    # Total optimiser steps; null derives them from `epochs` over the class table.
    max_steps: Optional[int] = resumable(None)
    # Passes over the class table when `max_steps` is null.
    epochs: float = resumable(3.0)
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
    # Recompute UNet activations in backward to save memory.
    gradient_checkpointing: bool = True
    # Write a sample grid every this many steps (0: only before and after).
    sample_every: int = resumable(200)
    # Classes shown in the sample grids (the first rows of the table).
    sample_classes: int = 8

    def check(self, where: str = "finetune") -> None:
        self.cluster.check(f"{where}.cluster")
        _require({
            **_positive(where, self, ("batch_size", "num_steps", "lora_rank", "d_hidden", "epochs")),
            f"{where}.grad_steps": (
                0 < self.grad_steps <= self.num_steps,
                f"must be > 0 and must not exceed {where}.num_steps ({self.num_steps}), got {self.grad_steps}",
            ),
            **_non_negative(where, self, ("lr", "d_lr", "w_en", "w_in", "lambda_q", "weight_decay", "grad_clip", "d_grad_clip",
                                          "d_warmup_passes", "sample_every", "sample_classes")),
            f"{where}.max_steps": (self.max_steps is None or self.max_steps > 0, f"must be > 0 or null, got {self.max_steps}"),
            **_has_name_slot(where, self, ("prompt_template", "clip_template", "real_template")),
        })


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
    output: str = resumable("runs/pretrain")
    # Ray Train workers, their resources, precision and checkpoints (flags --workers, --use-gpu, ...).
    cluster: TrainCluster = field(default_factory=functools.partial(TrainCluster, cpus_per_worker=2.0, checkpoint_every=1))
    # Any timm model name.
    model: str = "resnet50"
    # Training recipe: "resnet" (these defaults: SGD, lr 0.1 per global batch, weight decay 1e-4) or "deit"
    # (transformers, e.g. ViT-S: AdamW, lr 5e-4 per 512 images scaled to the global batch, weight decay 0.05,
    # 5 warm-up epochs, mixup 0.8 + cutmix 1.0, label smoothing 0.1, drop path 0.1). The recipe sets those fields;
    # a preset's, a config file's or a flag's own value for one of them still wins.
    recipe: str = "resnet"
    # Passes over the training rows.
    epochs: int = resumable(100)
    # Images per worker per step.
    batch_size: int = 256
    # Peak learning rate (for the global batch, or per `lr_base_batch` images), reached after the warm-up.
    lr: float = 0.1
    # When set, `lr` is scaled by global batch / lr_base_batch (the linear scaling rule DeiT uses); null: as given.
    lr_base_batch: Optional[int] = None
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
    # Mixup and CutMix alphas (timm's Mixup, one of the two per batch when both are set); 0: off.
    mixup: float = 0.0
    cutmix: float = 0.0
    # Stochastic depth rate of the model (timm's drop_path_rate).
    drop_path: float = 0.0
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
    skip_bad_shards: bool = resumable(False)
    # Rows per decode+augment call in Ray Data.
    decode_batch_size: int = resumable(64)
    # Where images are decoded and cropped: "cpu" (Ray Data tasks) or "cuda" (nvJPEG on the training GPUs,
    # which needs use_gpu; Ray Data's CPUs then only read and draw crops: README, "Feeding the GPUs").
    decode_device: str = resumable("cpu")
    # Rows per block read from a shard: small blocks let several CPUs decode before a shard is read whole.
    read_block_rows: int = resumable(512)
    # Rows in each worker's local shuffle buffer (Ray Data streams; there is no global shuffle).
    shuffle_buffer: int = resumable(10000)

    def check(self, where: str = "pretrain") -> None:
        _require({
            f"{where}.model": (bool(self.model.strip()), "must name a timm model"),
            **_positive(where, self, ("epochs", "batch_size", "lr")),
            **_non_negative(where, self, ("weight_decay",)),
            f"{where}.warmup_epochs": (0 <= self.warmup_epochs < self.epochs, f"must be in [0, epochs={self.epochs}), got {self.warmup_epochs}"),
            f"{where}.min_lr": (0 <= self.min_lr <= self.lr, f"must be in [0, lr], got {self.min_lr}"),
            f"{where}.warmup_lr": (0 <= self.warmup_lr <= self.lr, f"must be in [0, lr], got {self.warmup_lr}"),
            f"{where}.label_smoothing": (0 <= self.label_smoothing < 1, f"must be in [0, 1), got {self.label_smoothing}"),
            f"{where}.recipe": (self.recipe in RECIPES, f"must be {' or '.join(RECIPES)}, got {self.recipe!r}"),
            f"{where}.lr_base_batch": (self.lr_base_batch is None or self.lr_base_batch > 0, f"must be > 0 or null, got {self.lr_base_batch}"),
            **_non_negative(where, self, ("mixup", "cutmix")),
            f"{where}.batch_size": (not (self.mixup or self.cutmix) or self.batch_size % 2 == 0,
                                    f"must be even with mixup/cutmix (they pair each image with another), got {self.batch_size}"),
            f"{where}.drop_path": (0 <= self.drop_path < 1, f"must be in [0, 1), got {self.drop_path}"),
            f"{where}.image_size": (self.image_size >= 8, f"must be >= 8, got {self.image_size}"),
            f"{where}.crop_pct": (0 < self.crop_pct <= 1, f"must be in (0, 1], got {self.crop_pct}"),
            f"{where}.crop_scale": (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                                    f"must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}"),
            f"{where}.crop_ratio": (len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
                                    f"must be [min, max] with 0 < min <= max, got {self.crop_ratio}"),
            f"{where}.hflip": (0 <= self.hflip <= 1, f"must be in [0, 1], got {self.hflip}"),
            f"{where}.mean": (len(self.mean) == 3, f"must have 3 values, got {self.mean}"),
            f"{where}.std": (len(self.std) == 3 and all(v > 0 for v in self.std), f"must have 3 values > 0, got {self.std}"),
            f"{where}.val_fraction": (0 <= self.val_fraction < 1, f"must be in [0, 1), got {self.val_fraction}"),
            **_positive(where, self, ("decode_batch_size", "read_block_rows")),
            f"{where}.decode_device": (_one_of(self.decode_device, DECODE_DEVICES) if self.decode_device != "cuda" else
                                       (self.cluster.use_gpu is True, (f"cuda decodes on the training GPUs, so it needs "
                                        f"{where}.cluster.use_gpu true (--use-gpu), got {self.cluster.use_gpu}"))),
            **_non_negative(where, self, ("shuffle_buffer",)),
        })
        self.cluster.check(f"{where}.cluster")


@dataclass
class EvaluateConfig:
    """Stage 4, `evaluate`: transfer of backbones to downstream classification sets (DESIGN 2.4)."""

    # Backbones to compare: a pretrain output dir (model.json), `random:<timm name>` or `timm:<timm name>`.
    backbone: list[str] = field(default_factory=list)
    # Downstream sets: ImageFolder dirs with train/ and val/ or test/, dirs of Parquet (image, label) with the same
    # splits, or `torchvision:NAME` (DTD, Food101, ..., FashionMNIST, CIFAR10) stored under data_root.
    downstream: list[str] = field(default_factory=list)
    # Root of the `torchvision:NAME` sets, in torchvision's own layout below it (downloaded there when online).
    data_root: str = "~/.cache/lbgen/datasets"
    # ImageNet-9-style dirs (original/, mixed_same/, mixed_rand/) for the background gap; empty: skipped.
    bias: list[str] = field(default_factory=list)
    # "linear": frozen features + logistic regression; "finetune": full fine-tuning; "classify": the backbone's own
    # classifier on real images of its classes (downstream: an ImageFolder of class-id folders, e.g. ImageNet val).
    protocol: str = "linear"
    # Also score, beside `protocol`, each exported backbone's own classifier on every downstream set's eval split
    # (the `classify` protocol): for sets whose folders are class ids of the backbone's table (make-downstream's
    # fashion-mnist for the `fashion10` table).
    also_classify: bool = False
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
    # Resources per (backbone, dataset) Ray task; null GPUs: one when the cluster has any. The cluster must hold
    # one such task, or evaluate refuses at once (after `resource_wait_s` for an autoscaling one to grow).
    task_cpus: float = 4.0
    task_gpus: Optional[float] = None

    def check(self, where: str = "evaluate") -> None:
        _require({
            f"{where}.protocol": (self.protocol in PROTOCOLS, f"must be {' or '.join(PROTOCOLS)}, got {self.protocol!r}"),
            f"{where}.fractions": (bool(self.fractions) and _in_unit(self.fractions, low_open=True), f"must be values in (0, 1], got {self.fractions}"),
            f"{where}.eval_image_size": (self.eval_image_size is None or self.eval_image_size >= 8, f"must be >= 8 or null, got {self.eval_image_size}"),
            **_positive(where, self, ("eval_batch_size",)),
            f"{where}.probe_val_fraction": (0 < self.probe_val_fraction < 1, f"must be in (0, 1), got {self.probe_val_fraction}"),
            f"{where}.probe_l2": (bool(self.probe_l2) and all(v >= 0 for v in self.probe_l2), f"must be values >= 0, got {self.probe_l2}"),
            **_positive(where, self, ("probe_max_iter", "ft_epochs", "ft_lr")),
            **_non_negative(where, self, ("ft_weight_decay",)),
            **_positive(where, self, ("ft_batch_size",)),
            **_non_negative(where, self, ("loader_workers",)),
            **_positive(where, self, ("task_cpus",)),
            f"{where}.task_gpus": (self.task_gpus is None or self.task_gpus >= 0, f"must be >= 0 or null, got {self.task_gpus}"),
        })


@dataclass
class RunAllConfig:
    """`run`: every stage end to end into one directory (finetune/, generate/, downstream/, pretrain/, evaluate/)."""

    # Directory of the whole run; each stage writes its own subdirectory and skips itself when complete.
    output: str = "runs/lbgen"

    def check(self, where: str = "run") -> None:
        pass


@dataclass
class ReportConfig:
    """`report`: the run report (`report.html`, `report.md`) that `run` writes at its end."""

    # CLIP cosine at or above which two images of a class count as near-duplicates (from the embeddings
    # `generate` stores; `lbgen inspect` uses the same default).
    near_duplicate_cosine: float = 0.95

    def check(self, where: str = "report") -> None:
        ok = 0 < self.near_duplicate_cosine <= 1
        _require({f"{where}.near_duplicate_cosine": (ok, f"must be in (0, 1], got {self.near_duplicate_cosine}")})


@dataclass
class BenchmarkConfig:
    """`benchmark`: steady generation speed of this machine's device with a config, and the dataset's projected cost."""

    # Batches timed after the warm-up batch (each `generate.batch_size` images).
    batches: int = 3
    # Price of one GPU-hour, for the cost projection (0: no cost, GPU-hours only).
    price_per_gpu_hour: float = 0.0
    # The device's peak dense TFLOP/s in the generation dtype, for "% of peak" (0: looked up by the GPU's name in
    # lbgen.stages.benchmark.PEAK_TFLOPS; none on a CPU).
    peak_tflops: float = 0.0
    # Find the largest micro-batch that fits in GPU memory (CUDA only: doubles it until memory runs out).
    find_max_micro_batch: bool = True
    # Write the figures as JSON to this file (null: print them only).
    json: Optional[str] = None

    def check(self, where: str = "benchmark") -> None:
        _require({
            **_positive(where, self, ("batches",)),
            **_non_negative(where, self, ("price_per_gpu_hour", "peak_tflops")),
        })


@dataclass
class MakeDownstreamConfig:
    """`make-downstream`: a procedural downstream set, so evaluation runs without downloads."""

    # "shapes" (ImageFolder train/ + test/), "shapes-in9" (original/ mixed_same/ mixed_rand/), or "fashion-mnist"
    # (real images, folders keyed by the `fashion10` class ids; test_per_class 1000: the whole test split).
    kind: str = "shapes"
    # Where to write it.
    output: str = "runs/downstream/shapes"
    # Images per class in train/ and in test/.
    train_per_class: int = 100
    test_per_class: int = 50
    # Side of the images in pixels.
    size: int = 64

    def check(self, where: str = "make_downstream") -> None:
        _require({
            f"{where}.kind": (self.kind in DOWNSTREAM_KINDS, f"must be {' or '.join(DOWNSTREAM_KINDS)}, got {self.kind!r}"),
            f"{where}.train_per_class": (self.train_per_class >= 2, f"must be >= 2, got {self.train_per_class}"),
            f"{where}.test_per_class": (self.test_per_class >= 1, f"must be >= 1, got {self.test_per_class}"),
            f"{where}.size": (self.size >= 16, f"must be >= 16, got {self.size}"),
        })


@dataclass
class GenerateConfig:
    """The `generate` stage (DESIGN 2.2): class table -> scored, resumable Parquet shards."""

    # Output dataset directory: a local path or an object-store URI (s3://bucket/ds, gs://..., file://...,
    # S3 endpoint in the query: ?endpoint_override=host:port&scheme=http); re-running with the same one resumes.
    output: str = resumable("runs/generate")
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
    batch_size: int = resumable(8)
    # Images per diffusion model call inside an actor. Every call is padded to exactly this many, so the
    # kernels see the same shapes whatever the batching, and an image's pixels never depend on its
    # neighbours (CPU and GPU kernels choose code paths by shape); part of what defines the dataset.
    micro_batch: int = 8
    # Score (CLIP, IQA) and encode each batch in the generation actor, on its device, so that only image bytes
    # leave it; false: a separate pool of scoring actors (a quarter of the generation actors, each on a quarter
    # of a GPU beside them) receives the raw pixels. The scores are the same either way.
    score_beside: bool = resumable(True)
    # Generation actors (one model copy each; one per GPU on a cluster); on an autoscaling cluster, the most.
    workers: int = resumable(1)
    # Generation actors to start with on a cluster that can grow: generation starts once these fit (having asked
    # the autoscaler for all `workers`), and the pool grows as GPU nodes arrive. A Ray that lbgen starts itself
    # cannot grow: all `workers` start at once.
    min_workers: int = resumable(1)
    # CPUs reserved per generation actor; fractions leave CPUs for Ray Data's read/encode tasks.
    cpus_per_worker: float = resumable(1.0)
    # torch intra-op threads per actor on CPU; pixels are bitwise reproducible only at equal thread counts.
    threads: int = 1
    # Generate on GPUs; null picks GPUs when the Ray cluster has any.
    use_gpu: Optional[bool] = resumable(None)
    # Weight dtype of the generation model on any device: "fp16", "bf16" or "fp32".
    dtype: str = "fp16"
    # Take the fast paths of generation named by `fast_paths` (--no-fast: none, the modules as diffusers builds
    # them). Each keeps the pixels up to the last bits (other kernels round differently: 1/255 at most in
    # tests/test_fast.py), and those bits are part of what defines the dataset, so `fast` and `fast_paths` are.
    fast: bool = True
    # The fast paths `fast` takes, all by default: sync_free (no host round trip per denoising step),
    # unload_lora, require_sdpa (an error rather than slow attention), fused_qkv, channels_last, cudnn_benchmark
    # (GPU), prompt_cache (each class prompt encoded once per actor). Name a subset to leave the others out.
    fast_paths: list[str] = field(default_factory=lambda: list(FAST_PATHS))
    # torch.compile the UNet with this mode, a fast path: "none", "default", "reduce-overhead" (CUDA graphs: the
    # choice on a GPU) or "max-autotune". Each actor compiles once, on its first micro-batch (minutes on a CPU).
    # Part of what defines the dataset: compiled kernels may round differently.
    compile: str = "none"
    # Also compile the VAE's decoder, in the mode of `compile`.
    compile_vae: bool = False
    # Stored image encoding: "jpeg", "png" or "webp".
    image_format: str = "jpeg"
    # Encoder quality for jpeg/webp (ignored for png).
    image_quality: int = 95
    # Rows per Parquet shard (shards are whole units of resume).
    rows_per_shard: int = 1000
    # Rows per Parquet row group (small groups keep image viewers responsive).
    row_group_rows: int = 100
    # Replace a dataset in `output` made with other settings instead of refusing.
    overwrite: bool = resumable(False)

    @property
    def taken_fast_paths(self) -> list[str]:
        """The fast paths generation takes, in `FAST_PATHS`' order: none with `fast` off."""
        return [path for path in FAST_PATHS if self.fast and path in self.fast_paths]

    def check(self, where: str = "generate") -> None:
        unknown_paths = sorted(set(self.fast_paths) - set(FAST_PATHS))
        _require({
            **_positive(where, self, ("images_per_class", "steps", "batch_size", "micro_batch", "workers", "cpus_per_worker", "threads",
                                      "rows_per_shard", "row_group_rows")),
            **_non_negative(where, self, ("guidance",)),
            f"{where}.min_workers": (1 <= self.min_workers <= self.workers,
                                     f"must be in 1..workers ({self.workers}), got {self.min_workers}"),
            f"{where}.image_format": _one_of(self.image_format, IMAGE_FORMATS),
            f"{where}.image_quality": (1 <= self.image_quality <= 100, f"must be in 1..100, got {self.image_quality}"),
            f"{where}.dtype": _one_of(self.dtype, WEIGHT_DTYPES),
            f"{where}.compile": _one_of(self.compile, COMPILE_MODES),
            f"{where}.fast_paths": (not unknown_paths,
                                    f"must name fast paths among {', '.join(FAST_PATHS)}, got {', '.join(unknown_paths)}"),
            f"{where}.fast": (self.fast or self.compile == "none",
                              f"must be on to compile (compiling is a fast path), got compile {self.compile!r}"),
            f"{where}.compile_vae": (not self.compile_vae or self.compile != "none",
                                     f"needs a {where}.compile mode to compile the VAE's decoder in, got 'none'"),
            **_has_name_slot(where, self, ("prompt_template", "score_template")),
        })


@dataclass
class FaultConfig:
    """TEST ONLY: kill one worker process hard, once, to prove a stage survives it (`lbgen.runtime.faults`).

    Off by default; set only in YAML or overrides (no command has flags for it). It travels
    inside the config to every Ray actor and train worker.
    """

    # Where to die: one of lbgen.config.choices.FAULT_POINTS, or null (no fault).
    point: Optional[str] = None
    # Die on the `after`-th time one process reaches `point` (1: the first time).
    after: int = 1
    # File created by the dying process; while it exists the fault never fires again (restarted workers live).
    marker: str = ""

    def check(self, where: str = "fault") -> None:
        if self.point is None:
            return
        _require({
            f"{where}.point": (self.point in FAULT_POINTS, f"must be one of {', '.join(FAULT_POINTS)} or null, got {self.point!r}"),
            f"{where}.after": (self.after > 0, f"must be > 0, got {self.after}"),
            f"{where}.marker": (bool(self.marker), f"must name the marker file when {where}.point is set"),
        })


@dataclass
class Config:
    """Everything a run needs; stages read their own section."""

    # Class table: a shipped name ("imagenet1k", "tiny10") or a .txt/.csv/.parquet path.
    classes: str = "imagenet1k"
    # Run seed: every random choice derives from it.
    seed: int = 0
    # Seconds a stage waits for an attached Ray cluster to grow (autoscaling) to what it needs at once
    # before refusing; a Ray that lbgen starts itself cannot grow, and a plan it cannot hold is refused at once.
    resource_wait_s: float = 600.0
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    make_downstream: MakeDownstreamConfig = field(default_factory=MakeDownstreamConfig)
    run: RunAllConfig = field(default_factory=RunAllConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def check(self) -> None:
        """Every section's check, each naming its own fields."""
        _require({"resource_wait_s": (self.resource_wait_s >= 0, f"must be >= 0, got {self.resource_wait_s}")})
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check(f.name)


def validate(cfg: Config) -> Config:
    """Refuse values the stages cannot run with; the message names the field."""
    cfg.check()
    return cfg


# ---------------------------------------------------------------- the schema describing itself


def leaf_fields(cls, prefix: tuple[str, ...] = ()):
    """(path, field, type) for every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, tp


def resumable_fields(section_cls) -> frozenset[str]:
    """Paths within `section_cls` (e.g. "epochs", "cluster.workers") of the settings a resumed run may change."""
    return frozenset(".".join(path) for path, f, _ in leaf_fields(section_cls) if f.metadata.get("resumable"))


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
        if text.startswith(("def ", "@")):  # the fields end where the section's check begins
            break
        name = text.split(":", 1)[0].strip()
        if text.startswith("#"):
            pending.append(text.lstrip("#").strip())
        elif ":" in text and name in names:
            shared = " ".join(pending) if pending else shared
            comments[name], pending = shared, []
        elif not text:
            pending, shared = [], ""
    return comments
