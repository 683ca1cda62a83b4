"""Stage 2, `generate`: a class table -> scored, resumable Parquet shards, on Ray Data.

Pipeline (each stage streams; memory does not grow with the dataset size):

    batches (shard, start, stop) -> flat_map(batch_rows)   plan: one row per image (label, index, seed, ...)
              -> map_batches(GenerateBatch)    diffusion (+ LoRA) on actors, a batch per task: pixels (B, H, W, 3) uint8
              -> map_batches(ScoreBatch)       CLIP score, embedding, zero-shot agreement, IQA score on actors
              -> map_batches(encode_images)    PNG/JPEG/WebP bytes, CPU tasks
              -> map_batches(write_parts)      a hidden part file per batch and shard; a row of metadata each
              -> driver: DatasetWriter         counts parts; a whole shard's `assemble_shard` task on a worker
                                               writes it atomically; the driver commits it to the manifest

(With `generate.score_beside`, the default, the actor itself scores, encodes and writes the parts: only the
parts' metadata leaves it, and no image passes through the driver.)

A batch (`generate.batch_size` rows), not a shard, is the unit of work, and each actor holds at most
`GENERATION_TASKS_IN_FLIGHT` of them: a slow GPU takes fewer batches instead of holding shards that the
others wait behind, and a lost node re-makes only its actors' in-flight batches.

The output (and the LoRA) may be a local path or an object-store URI (`lbgen.runtime.storage`).

An image's seed is a pure function of (run seed, label, index) and every image draws
its noise from its own generator, so batch size, actor count and resume never change
an image. `GenerateBatch` is the one generation code path: tests call it on a batch
dict, Ray Data calls it inside `map_batches`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from functools import partial

import numpy as np
import torch

from lbgen.config import Config, ConfigError, GenerateConfig, from_dict, resumable_fields
from lbgen.data.classes import ClassTable, load_class_table
from lbgen.data.format import label_names
from lbgen.data.images import encode_images
from lbgen.data.plan import SHARD_ORDER, batch_rows, batches_of, plan, shard_sizes  # noqa: F401  (plan is public here too)
from lbgen.data.reader import format_summary
from lbgen.runtime.storage import locate
from lbgen.data.writer import DatasetPlan, DatasetWriter, assemble_shard, write_parts
from lbgen.errors import UserError, root_cause
from lbgen.method.sampler import decode, denoise, encode_prompts, initial_latents
from lbgen.method.sync_free import denoise_sync_free
from lbgen.models.generator import LORA_FILE, simulates_gpu
from lbgen.runtime import faults, resources
from lbgen.runtime.outputs import check_output_dir
from lbgen.runtime.precision import weight_dtype
from lbgen.runtime.progress import quiet_logger
from lbgen.runtime.resources import Request, use_gpu

# Settings that do not change a single row: a resumed run may change them.
RESUMABLE_FIELDS = resumable_fields(GenerateConfig)
# Share of a GPU per scoring actor; generation actors take the rest, so both fit on one GPU.
SCORE_GPU_SHARE = 0.25


class LoraError(ConfigError):
    """A LoRA directory cannot be used; the message names it."""


class SlowAttentionError(ConfigError):
    """A generator's attention would not run through SDPA on the fast path; the message names its processors."""


# ---------------------------------------------------------------- models


def check_lora(directory: str | None) -> str | None:
    """sha256 of the LoRA file in `directory` (None without LoRA); an unusable LoRA -> LoraError."""
    if directory is None:
        return None
    path = locate(directory) / LORA_FILE
    if not path.is_file():
        raise LoraError(f"LoRA directory {directory} holds no {LORA_FILE} (finetune writes one)")
    data = path.read_bytes()
    if not load_lora(data, str(path)):
        raise LoraError(f"LoRA file {path} holds no tensors")
    return hashlib.sha256(data).hexdigest()


def load_lora(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA safetensors file's bytes (read through `lbgen.runtime.storage`: local or a URI)."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:  # noqa: BLE001  safetensors raises its own error types for a corrupt header
        raise LoraError(f"LoRA file {where} is unreadable: {err}") from None


def load_lora_into(pipe, directory: str, generator: str) -> None:
    """Load and fuse the LoRA of `directory` (local or a URI) into `pipe`, at the scale it was trained with.

    The file goes through diffusers' own safetensors loader, alone in a temporary directory: the
    adapter config in its metadata (alpha) is applied, and there is no `.bin` beside it to unpickle.
    """
    import tempfile
    from pathlib import Path

    lora = locate(directory) / LORA_FILE
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / LORA_FILE).write_bytes(lora.read_bytes())
        try:
            pipe.load_lora_weights(tmp, weight_name=LORA_FILE, use_safetensors=True)
            pipe.fuse_lora()  # merged once: no adapter matmuls per step (FastPath also drops the adapter layers)
        except Exception as err:  # noqa: BLE001  diffusers/peft raise many types for a mismatched LoRA
            raise LoraError(f"LoRA {directory} cannot be loaded into {generator}: {err}") from None


def generator_id(cfg: Config, lora_sha: str | None) -> str:
    """What made the images: the model id, plus the LoRA's sha256."""
    return cfg.model.generator + (f"+lora:sha256:{lora_sha}" if lora_sha else "")


def attention_processors(model) -> dict:
    """`model`'s attention processors by layer name; none for a model without diffusers attention (`sleep:`)."""
    return getattr(model, "attn_processors", {})


def require_sdpa(model, what: str) -> None:
    """Raise SlowAttentionError unless every attention processor of `model` runs SDPA (`AttnProcessor2_0`, or its
    fused-projection form): the fast path fails loudly rather than run the classic attention, which materialises
    every score matrix. Diffusers picks the classic one itself where SDPA would be wrong (`scale_qk=False`)."""
    from collections import Counter

    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    slow = Counter(type(p).__name__ for p in attention_processors(model).values()
                   if not isinstance(p, (AttnProcessor2_0, FusedAttnProcessor2_0)))
    if slow:
        found = ", ".join(f"{name} ({count} layers)" for name, count in sorted(slow.items()))
        raise SlowAttentionError(f"the {what}'s attention runs {found}, not SDPA (AttnProcessor2_0): fast generation "
                                 "refuses slow attention; --fast-paths without require_sdpa, or --no-fast, runs the model as it is")


def fuse_qkv(model) -> None:
    """One projection per attention layer for q, k and v (self-attention) or k and v (cross-attention); the
    processors become `FusedAttnProcessor2_0`. A model without diffusers attention stays as it is."""
    if attention_processors(model):
        model.fuse_qkv_projections()


def compile_module(module: torch.nn.Module, mode: str) -> None:
    """torch.compile `module`'s calls in place with `mode` (the module and its attributes stay); "none": leave it.
    Every call has the padded micro-batch's shapes, so an actor compiles once, on its first micro-batch."""
    if mode != "none":
        module.compile(mode=mode)


def _unload_lora(pipe, device: torch.device, gen: GenerateConfig) -> None:
    if gen.lora:
        pipe.unload_lora_weights()  # plain modules again; `fuse_lora` merged the weights, which stay


def _require_sdpa(pipe, device: torch.device, gen: GenerateConfig) -> None:
    for what, model in (("UNet", pipe.unet), ("VAE", pipe.vae)):
        require_sdpa(model, what)


def _fuse_qkv(pipe, device: torch.device, gen: GenerateConfig) -> None:
    for model in (pipe.unet, pipe.vae):
        fuse_qkv(model)


def _channels_last(pipe, device: torch.device, gen: GenerateConfig) -> None:
    for model in (pipe.unet, pipe.vae):
        model.to(memory_format=torch.channels_last)


def _cudnn_benchmark(pipe, device: torch.device, gen: GenerateConfig) -> None:
    if device.type == "cuda":
        # cuDNN times its convolution algorithms for each new shape and keeps the fastest: the padded micro-batch
        # has one. Which algorithm wins may differ between GPUs and runs, and so may the last bits of a pixel.
        torch.backends.cudnn.benchmark = True


# The fast paths that change the pipeline's modules (`generate.fast_paths`), in the order they apply: SDPA is
# required before fusing, which would put the fused SDPA processor over a slow one. `FastPath` itself takes
# sync_free (its denoising loop), channels_last (its latents) and prompt_cache.
MODULE_CHANGES = {"unload_lora": _unload_lora, "require_sdpa": _require_sdpa, "fused_qkv": _fuse_qkv,
                  "channels_last": _channels_last, "cudnn_benchmark": _cudnn_benchmark}


def speed_up(pipe, device: torch.device, gen: GenerateConfig, paths: list[str]) -> None:
    """`FastPath`'s changes to the modules of `pipe`, in place: those of the fast `paths` taken, then `generate.compile`."""
    for path, change in MODULE_CHANGES.items():
        if path in paths:
            change(pipe, device, gen)
    compile_module(pipe.unet, gen.compile)
    compile_module(pipe.vae.decoder, gen.compile if gen.compile_vae else "none")


def _pad_rows(values: list, size: int) -> list:
    """`values` with the last one repeated up to `size` entries (a micro-batch of exactly `size` images).

    Kernels choose code paths by shape: torch 2.14's CPU Linear rounds the last bit differently
    for 4 and 16 rows, enough to flip a pixel. Model calls of one fixed shape give every image
    bitwise the same pixels wherever it sits, in any batch or alone.
    """
    return values + values[-1:] * (size - len(values))


class EagerPath:
    """How `GenerateBatch` runs with `generate.fast` off (`--no-fast`): the modules as diffusers builds them (the
    LoRA merged inside its adapter layers), `denoise` with diffusers' own scheduler steps, and the prompts
    encoded with every micro-batch."""

    denoise = staticmethod(denoise)
    memory_format = torch.contiguous_format

    def __init__(self, pipe, device: torch.device, gen: GenerateConfig):
        self.pipe, self.device = pipe, device

    def prompt_states(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text-encoder states of a micro-batch's prompts, padded to `micro_batch`."""
        return encode_prompts(self.pipe, prompts, self.device)


class FastPath(EagerPath):
    """`generate.fast` (`--fast`): `EagerPath`'s pixels, up to the last bits, with less work per image, through the
    fast paths of `generate.fast_paths` (what each does: `lbgen.config.choices.FAST_PATHS`), then `generate.compile`.
    The module changes are `MODULE_CHANGES`'; this class takes the denoising loop, the latents' memory format and
    the prompt cache.
    """

    def __init__(self, pipe, device: torch.device, gen: GenerateConfig):
        super().__init__(pipe, device, gen)
        paths = gen.taken_fast_paths
        speed_up(pipe, device, gen, paths)
        if "sync_free" in paths:
            self.denoise = denoise_sync_free
        if "channels_last" in paths:
            self.memory_format = torch.channels_last
        self.rows = gen.micro_batch
        # prompt -> (L, D) states on the device: 118 KB a prompt in fp16 at SD 1.5's size, 118 MB for 1000 classes.
        # None: every micro-batch's prompts encoded with it, as on the eager path.
        self.states: dict[str, torch.Tensor] | None = {} if "prompt_cache" in paths else None

    def prompt_states(self, prompts: list[str]) -> torch.Tensor:
        """`EagerPath.prompt_states`, bitwise: each prompt was encoded once, in a batch of `micro_batch` rows as
        every micro-batch is (a CPU kernel's rounding may depend on the row count, never on the other rows)."""
        if self.states is None:
            return super().prompt_states(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.states))
        for start in range(0, len(missing), self.rows):
            chunk = missing[start : start + self.rows]
            encoded = super().prompt_states(_pad_rows(chunk, self.rows))
            self.states.update((prompt, states.clone()) for prompt, states in zip(chunk, encoded))
        return torch.stack([self.states[p] for p in prompts])


class GenerateBatch:
    """Ray Data callable: plan rows -> the same rows + `pixels` (B, H, W, 3) uint8.

    Loads the generator (and LoRA) once, in `__init__`; `__call__` is pure given the rows. `generate.fast` chooses
    how the model runs (`FastPath`, `EagerPath`).
    """

    def __init__(self, config: dict, device: str = "cpu"):
        from lbgen.models.generator import create_generator, create_scheduler

        cfg = from_dict(Config, config)
        gen = cfg.generate
        self.cfg, self.device = cfg, torch.device(device)
        torch.set_num_threads(gen.threads)  # equal thread counts keep CPU results bitwise equal
        pipe = create_generator(cfg.model.generator, resolution=cfg.model.resolution, seed=cfg.seed)
        if gen.lora:
            load_lora_into(pipe, gen.lora, cfg.model.generator)
        self.pipe = pipe.to(self.device, weight_dtype(gen.dtype))
        self.path = (FastPath if gen.fast else EagerPath)(self.pipe, self.device, gen)
        self.scheduler = create_scheduler(gen.scheduler, pipe.scheduler.config)
        # The empty negative prompt's states, as many rows as every (padded) micro-batch: expanded once per actor.
        self.uncond = encode_prompts(self.pipe, [""], self.device).expand(gen.micro_batch, -1, -1)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = self.cfg.generate.micro_batch
        seeds, prompts = [int(s) for s in batch["seed"]], [str(p) for p in batch["prompt"]]
        pixels = [self._sample(seeds[i : i + size], prompts[i : i + size]) for i in range(0, len(seeds), size)]
        return {**batch, "pixels": np.concatenate(pixels)}

    def _sample(self, seeds: list[int], prompts: list[str]) -> np.ndarray:
        """(len(seeds), H, W, 3) uint8 pixels of one micro-batch, run padded to `micro_batch` images."""
        gen, rows = self.cfg.generate, len(seeds)
        seeds, prompts = _pad_rows(seeds, gen.micro_batch), _pad_rows(prompts, gen.micro_batch)
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]  # one per image
        unet, vae = self.pipe.unet, self.pipe.vae
        latents = initial_latents(len(seeds), unet, self.pipe.vae_scale_factor, self.cfg.model.resolution,
                                  generators, self.device).to(unet.dtype, memory_format=self.path.memory_format)
        cond = self.path.prompt_states(prompts)  # (B, L, D)
        latents = self.path.denoise(unet, self.scheduler, latents, cond, self.uncond, num_steps=gen.steps,
                                    guidance=gen.guidance, generator=generators)
        faults.maybe_die(self.cfg.fault, "generate.batch")  # test only: off unless cfg.fault says so
        images = decode(vae, latents)[:rows]  # (B, 3, H, W) in [0, 1]
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ScoreBatch:
    """Ray Data callable: adds `clip_score`, `clip_agrees`, `iqa_score`, `clip_embedding` to rows holding `pixels`.

    `clip_score` is the cosine between the image and its own class text; `clip_embedding` is the
    unit image embedding it came from, (B, D) float16, kept for diversity and near-duplicates; `clip_agrees` is
    CLIP zero-shot over the whole table ranking the own label first (ties count, so a
    repeated name does not lose to its twin).
    """

    def __init__(self, config: dict, device: str = "cpu"):
        from lbgen.models import create_clip, create_iqa

        cfg = from_dict(Config, config)
        self.device = torch.device(device)
        torch.set_num_threads(cfg.generate.threads)
        table = load_class_table(cfg.classes)
        self.clip = create_clip(cfg.model.clip, cfg.model.clip_pretrained, device=self.device, seed=cfg.seed)
        self.quality = create_iqa(cfg.model.iqa, device=self.device, seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code)
        self.text = self.clip.encode_text(table.prompts(cfg.generate.score_template))  # (C, D)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["label"])
        pixels = np.concatenate([batch["pixels"], batch["pixels"][-1:].repeat(max(0, 2 - rows), 0)])
        images = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
        embedded = self.clip.encode_image(images)[:rows]  # (B, D), unit length
        sims = embedded @ self.text.T  # (B, C)
        labels = torch.as_tensor(batch["label"], device=self.device).long()
        own = sims.gather(1, labels[:, None])[:, 0]
        return {
            **batch,
            "clip_score": own.cpu().numpy().astype(np.float32),
            "clip_agrees": (own >= sims.max(dim=1).values).cpu().numpy(),
            "iqa_score": self.quality(images)[:rows].cpu().numpy().astype(np.float32),
            "clip_embedding": embedded.cpu().numpy().astype(np.float16),
        }


class GenerateScoreWrite:
    """Ray Data callable: plan rows -> written parts' metadata, all in one actor on one device (`generate.score_beside`).

    `GenerateBatch`, `ScoreBatch`, `encode_images` and `write_parts`, unchanged: only a row of metadata per part
    leaves the actor, where a separate scoring pool moved each image's raw pixels (786 KB at 512 px) through the
    object store twice, from the generation actor to a scoring actor and on to an encoding task.
    `parts`: `write_parts`' keyword arguments (`DatasetWriter.part_settings`).
    """

    def __init__(self, config: dict, parts: dict, device: str = "cpu"):
        self.generate, self.score = GenerateBatch(config, device), ScoreBatch(config, device)
        gen = from_dict(Config, config).generate
        self.image_format, self.quality, self.parts = gen.image_format, gen.image_quality, parts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return write_parts(encode_images(self.score(self.generate(batch)), self.image_format, self.quality), **self.parts)


# ---------------------------------------------------------------- what the dataset is


def content_settings(cfg: Config, table: ClassTable, lora_sha: str | None) -> dict:
    """Every setting that defines a row's content; two runs with equal settings make equal rows."""
    gen = {k: v for k, v in dataclasses.asdict(cfg.generate).items() if k not in RESUMABLE_FIELDS | {"lora"}}
    gen["fast_paths"] = cfg.generate.taken_fast_paths  # in one order, and none when fast is off
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "trust_remote_code"}
    table_sha = hashlib.sha256(json.dumps([table.ids, table.names]).encode()).hexdigest()
    return {"seed": cfg.seed, "classes_sha256": table_sha, "num_classes": len(table), "model": model,
            "lora_sha256": lora_sha, "generate": gen, "shard_order": SHARD_ORDER}


def dataset_plan(cfg: Config, table: ClassTable, lora_sha: str | None) -> DatasetPlan:
    """What `cfg` generates from `table`, for the writer: content, labels, shard sizes, card."""
    gen = cfg.generate
    generator = generator_id(cfg, lora_sha)
    return DatasetPlan(
        content=content_settings(cfg, table, lora_sha), label_names=label_names(table.ids, table.names),
        images_per_class=gen.images_per_class, shard_rows=shard_sizes(len(table), cfg), generator=generator, row_group_rows=gen.row_group_rows,
        description=f"Images generated by lbgen from {len(table)} class names ({table.source}), "
                    f"{gen.images_per_class} per class, with {generator}.",
    )


# ---------------------------------------------------------------- Ray Data pipeline


# CPUs of the planning/encoding tasks and of the scoring actor: they must fit beside the generation actors.
LIGHT_CPUS = 0.25
# Batches a generation actor holds at once: the one it runs and the next, so that its GPU never waits on the
# scheduler between batches. More would let a slow GPU hoard batches that faster ones then wait for at the end;
# one cost more on the simulated cluster (straggler efficiency 0.69 against 0.80: benchmarks/RESULTS.md).
GENERATION_TASKS_IN_FLIGHT = 2


def pipeline_requests(gen: GenerateConfig, gpus: bool, workers: int | None = None) -> tuple[Request, ...]:
    """What the pipeline holds at once with `workers` generation actors (default: `gen.workers`): those, scoring
    actors unless they score beside generation, and a slot for the planning, encoding and assembly tasks
    (without one, the actors wait for input forever)."""
    workers = workers or gen.workers
    light = Request("planning/encoding task slot", 1, {"CPU": LIGHT_CPUS})
    if gen.score_beside:
        return Request("generation actor(s)", workers, {"CPU": gen.cpus_per_worker, "GPU": 1 if gpus else 0}), light
    return (
        Request("generation actor(s)", workers, {"CPU": gen.cpus_per_worker, "GPU": (1 - SCORE_GPU_SHARE) if gpus else 0}),
        Request("scoring actor(s)", max(1, workers // 4), {"CPU": LIGHT_CPUS, "GPU": SCORE_GPU_SHARE if gpus else 0}),
        light,
    )


def starting_workers(gen: GenerateConfig) -> int:
    """Generation actors the pool starts with: `min_workers` where the cluster can grow (the pool grows as nodes
    arrive), else all `workers` (a Ray that lbgen started has all it will ever have)."""
    return gen.min_workers if resources.cluster_can_grow() else gen.workers


def build_pipeline(cfg: Config, table: ClassTable, shards: list[int], device: str, gpus: bool, parts: dict,
                   min_workers: int | None = None):
    """The lazy Ray Data dataset of the part files of `shards` (see the module docstring): a row of metadata per
    part. Its actors hold GPUs when `gpus`, and run their models on `device`; `parts`: `write_parts`' settings.
    The generation pool starts with `min_workers` actors (default: all) and grows to `generate.workers`."""
    import ray

    gen, config = cfg.generate, dataclasses.asdict(cfg)
    generation, *scoring, light = pipeline_requests(gen, gpus)
    work = batches_of(shards, shard_sizes(len(table), cfg), gen.batch_size)
    ds = ray.data.from_items(work, override_num_blocks=max(1, len(work)))  # a block per batch: Ray never splits a block
    # As many planning tasks as actors: a batch per task, and one at a time starved four simulated GPUs
    # (straggler efficiency 0.37 against 0.80).
    ds = ds.flat_map(partial(batch_rows, names=table.names, ids=table.ids, cfg=cfg), num_cpus=light.resources["CPU"],
                     compute=ray.data.TaskPoolStrategy(size=max(1, gen.workers)))
    # A generation or scoring actor that dies (OOM, lost node) loses nothing: Ray Data creates actor pools
    # with max_restarts=-1 and max_task_retries=-1 (ActorPoolMapOperator._apply_default_remote_args), so
    # Ray restarts the actor and re-runs its in-flight batches. Setting them here would need map_batches'
    # deprecated **ray_remote_args (gone in Ray 2.64); a test kills an actor mid-batch to hold Ray to it.
    actor, kwargs = ((GenerateScoreWrite, {"config": config, "parts": parts, "device": device}) if gen.score_beside
                     else (GenerateBatch, {"config": config, "device": device}))
    ds = ds.map_batches(
        actor, fn_constructor_kwargs=kwargs,
        batch_size=gen.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=min_workers or generation.count, max_size=generation.count,
                                           max_tasks_in_flight_per_actor=GENERATION_TASKS_IN_FLIGHT),
        num_cpus=generation.resources["CPU"], num_gpus=generation.resources["GPU"], batch_format="numpy",
    )
    if gen.score_beside:
        return ds
    ds = ds.map_batches(
        ScoreBatch, fn_constructor_kwargs={"config": config, "device": device}, batch_size=gen.batch_size,
        compute=ray.data.ActorPoolStrategy(size=scoring[0].count), num_cpus=scoring[0].resources["CPU"],
        num_gpus=scoring[0].resources["GPU"], batch_format="numpy",
    )
    ds = ds.map_batches(encode_images, fn_kwargs={"image_format": gen.image_format, "quality": gen.image_quality},
                        batch_size=gen.batch_size, num_cpus=light.resources["CPU"], batch_format="numpy",
                        compute=ray.data.TaskPoolStrategy(size=max(1, gen.workers)))
    return ds.map_batches(write_parts, fn_kwargs=parts, batch_size=gen.batch_size, num_cpus=light.resources["CPU"],
                          batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=max(1, gen.workers)))


def check_inputs(cfg: Config) -> tuple[ClassTable, str | None]:
    """The class table and the LoRA's sha256; raises for the first unusable input, before anything is written."""
    from lbgen.models.generator import SCHEDULERS, check_generator

    table = load_class_table(cfg.classes)
    if cfg.generate.scheduler not in SCHEDULERS:
        raise ConfigError(f"generate.scheduler: unknown {cfg.generate.scheduler!r}; known: {', '.join(SCHEDULERS)}")
    check_generator(cfg.model.generator)  # here, not deep inside a Ray actor
    lora_sha = check_lora(cfg.generate.lora)
    check_output_dir(cfg.generate.output, "generate.output")
    return table, lora_sha


def generate(cfg: Config, checked: tuple[ClassTable, str | None] | None = None, *, show_progress: bool = True) -> dict:
    """Generate (or resume) the dataset of `cfg` into `cfg.generate.output`; returns the manifest.

    Raises ClassTableError, LoraError, ConfigError or DatasetError before touching the
    output when the class table, LoRA, settings or output directory are unusable. `checked`:
    what `check_inputs(cfg)` returned, when the caller ran it (the CLI's pre-flight).
    """
    gen = cfg.generate
    table, lora_sha = checked or check_inputs(cfg)
    plan_ = dataset_plan(cfg, table, lora_sha)
    gpus = use_gpu(gen.use_gpu)
    # A simulated GPU (the `sleep:<ms>` stand-in) is scheduled like one but computes on the CPU.
    device = "cuda" if gpus and not simulates_gpu(cfg.model.generator) else "cpu"
    start_with, full = starting_workers(gen), pipeline_requests(gen, gpus)
    resources.require("generate", pipeline_requests(gen, gpus, start_with), "generate.min_workers (--min-workers), "
                      "generate.workers (--workers), generate.cpus_per_worker (--cpus-per-worker) or generate.use_gpu "
                      "(--use-gpu)", cfg.resource_wait_s, ask_for=full)
    # `run`: how this run makes its images (the last run's, on a resumed dataset). From here on, Ray Data's own
    # autoscaling coordinator asks the cluster for what the pool can use, and the pool grows onto the nodes that
    # the wait above launched (tests/sim_cluster.py's autoscaler scenario; ray #59144 is fixed in Ray 2.60).
    with DatasetWriter.open(gen.output, plan_, config=dataclasses.asdict(cfg), run={"device": device, "precision": gen.dtype},
                            overwrite=gen.overwrite) as writer:
        return _generate_into(writer, cfg, table, device, gpus, start_with, show_progress)


def _generate_into(writer: DatasetWriter, cfg: Config, table: ClassTable, device: str, gpus: bool, start_with: int,
                   show_progress: bool) -> dict:
    """Make the shards `writer` still lacks through the Ray Data pipeline; returns the final manifest."""
    ds = build_pipeline(cfg, table, writer.todo, device, gpus, writer.part_settings(), start_with) if writer.todo else None
    return write_dataset(writer, ds, show_progress)


def write_dataset(writer: DatasetWriter, ds, show_progress: bool = True) -> dict:
    """The driver's loop: count the parts that `ds` (`build_pipeline`'s, None when nothing is left) reports, have
    each whole shard assembled by a task on a worker, commit it; returns the final manifest.

    The driver touches no image: at a few hundred bytes of metadata per batch it keeps up with thousands of GPUs
    (benchmarks/RESULTS.md), where writing every shard itself capped a run at a few hundred.
    """
    import ray
    from tqdm.auto import tqdm

    plan_ = writer.plan
    start, made = time.perf_counter(), sum(plan_.shard_rows[k] for k in writer.todo)
    assemble = ray.remote(num_cpus=LIGHT_CPUS)(assemble_shard)
    assembling = {}  # task -> its shard
    try:
        if ds is not None:
            # This dataset's context, not Ray's global one: the stages after generation (pre-training's ingest in
            # `lbgen run`) keep Ray Data's defaults. Parts arrive in any order: in order, every actor's output would
            # wait behind the earliest unfinished batch.
            ds.context.enable_progress_bars = False  # lbgen draws its own bar
            with quiet_logger("ray.data", logging.ERROR), \
                    tqdm(total=made, desc="generate", unit="img", disable=not show_progress, dynamic_ncols=True) as bar:
                for meta in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for shard, parts in writer.add_parts(meta):
                        assembling[assemble.remote(writer.where, shard, parts, plan_.row_group_rows)] = shard
                    _commit_assembled(writer, assembling, wait=False)
                    bar.update(int(meta["rows"].sum()))
        _commit_assembled(writer, assembling, wait=True)
    except BaseException as err:
        # The output's lock is released on the way out: no task of this run may write there after it.
        for task in assembling:
            ray.cancel(task)
        cause = root_cause(err)  # a full disk, say: its one-line error, not Ray's traceback around it
        if isinstance(cause, UserError):
            raise cause from None
        raise
    return writer.finish(made, time.perf_counter() - start)


def _commit_assembled(writer: DatasetWriter, assembling: dict, wait: bool) -> None:
    """Commit the shards whose assembly tasks are done (all of them, when `wait`), and forget those tasks."""
    import ray

    if not assembling:
        return
    done, _ = ray.wait(list(assembling), num_returns=len(assembling), timeout=None if wait else 0)
    for task in done:
        writer.commit(assembling.pop(task), ray.get(task))


def summary_text(manifest: dict) -> str:
    """The final terminal summary of a run."""
    extra = {"shards": f"{manifest['totals']['shards']}/{manifest['num_shards']}",
             "made": manifest["throughput"]["images_this_run"], "images/s": manifest["throughput"]["images_per_s"]}
    return format_summary(manifest["summary"], extra)


def done_line(cfg: Config, manifest: dict) -> str:
    """What the CLI prints when generation is done."""
    return f"{summary_text(manifest)}\ndataset: {cfg.generate.output}"
