"""Stage 1, `finetune`: LoRA fine-tuning of the generator with lbGen's losses on Ray Train.

`Finetuner` holds one worker's state and does the science in plain PyTorch
(`train_step`, `warmup_discriminator`); `train_loop_per_worker` is the thin Ray
Train function around it; `finetune(cfg)` is the driver. The same loop runs in
1 or N workers: DDP (through `ray.train.torch.prepare_model`) averages the LoRA
and discriminator gradients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lbgen.config import Config, ConfigError, FinetuneConfig, from_dict, require_local, resumable_fields, to_yaml
from lbgen.data.classes import ClassTable, load_class_table
from lbgen.method.losses import Discriminator, LbGenLoss, discriminator_loss, draw_real_classes
from lbgen.method.sampler import TrainableSampler, encode_prompts, gradient_step_indices, initial_latents
from lbgen.models import create_clip, create_generator, create_iqa
from lbgen.models.generator import LORA_FILE
from lbgen.models.iqa import SCORERS, has_pixel_gradient
from lbgen.runtime import faults, outputs, training
from lbgen.runtime.locks import OutputLock
from lbgen.runtime.precision import MixedPrecision
from lbgen.runtime.progress import MetricsLog, MetricsProgress
from lbgen.runtime.seeds import derive_seed, seeded_generator

DISC_FILE = "discriminator.safetensors"
ADAPTER_FILE = "adapter.safetensors"  # peft-format LoRA inside checkpoints
OPTIM_FILE = "optimizers.pt"  # tensors and numbers only: loads with weights_only=True
STATE_FILE = "state.json"
# Sample grid layout (torchvision's make_grid), for people; the report reads the per-class tiles.
GRID_COLUMNS = 8
GRID_PADDING = 2

# Settings a resumed run may change (marked resumable in the schema); any other difference means a different run.
RESUMABLE_FIELDS = resumable_fields(FinetuneConfig)


def total_steps(cfg: Config, num_classes: int) -> int:
    """`max_steps`, or enough steps for `epochs` passes over the class table."""
    ft = cfg.finetune
    if ft.max_steps is not None:
        return ft.max_steps
    return max(1, math.ceil(ft.epochs * num_classes / (ft.batch_size * ft.cluster.workers)))


def class_batch(step: int, rank: int, world: int, batch_size: int, num_classes: int, seed: int) -> torch.Tensor:
    """(B,) labels of this rank at `step`: consecutive slices of a per-epoch permutation of the table.

    A pure function of its arguments, so a resumed run draws the same classes.
    """
    labels = []
    for j in range(batch_size):
        position = (step * world + rank) * batch_size + j
        epoch, offset = divmod(position, num_classes)
        order = torch.randperm(num_classes, generator=seeded_generator(seed, "epoch", epoch))
        labels.append(int(order[offset]))
    return torch.tensor(labels, dtype=torch.long)


def lora_config(ft: FinetuneConfig):
    """The peft `LoraConfig` of the trained adapter; exported with the weights, so loaders apply its alpha."""
    from peft import LoraConfig

    return LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, init_lora_weights="gaussian", target_modules=list(ft.lora_targets))


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class Finetuner:
    """One worker's fine-tuning state: models, losses, optimisers; plain PyTorch."""

    def __init__(self, cfg: Config, *, rank: int = 0, world: int = 1, device="cpu", wrap: Callable = lambda m: m):
        from diffusers import DDPMScheduler

        ft = cfg.finetune
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device(device)
        self.table: ClassTable = load_class_table(cfg.classes)
        self.precision = MixedPrecision(ft.cluster.mixed_precision, self.device)

        pipe = create_generator(cfg.model.generator, resolution=cfg.model.resolution, seed=cfg.seed)
        self.pipe = pipe.to(self.device, self.precision.weight_dtype)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        # Same LoRA init on every rank (DDP also broadcasts rank 0's weights).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "lora"))
            pipe.unet.add_adapter(lora_config(ft))
        for p in trainable_parameters(pipe.unet):
            p.data = p.data.float()  # LoRA trains in fp32 under autocast
        if ft.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.vae.enable_gradient_checkpointing()
        pipe.unet.train()

        # Training always samples with DDPM (the authors' generation silently did not).
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.sampler = TrainableSampler(pipe.unet, pipe.vae, scheduler, num_steps=ft.num_steps, guidance=ft.guidance)
        self.sampler_ddp = wrap(self.sampler)

        self.clip = create_clip(cfg.model.clip, cfg.model.clip_pretrained, device=self.device, seed=cfg.seed)
        self.quality = create_iqa(cfg.model.iqa, device=self.device, seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code)
        text_features = self.clip.encode_text(self.table.prompts(ft.clip_template))
        self.loss_fn = LbGenLoss(self.clip, self.quality, text_features, w_en=ft.w_en, w_in=ft.w_in, lambda_q=ft.lambda_q)
        # (C, D) the discriminator's "real" side: the class names' own embeddings, not L_in's prompts.
        self.real_features = self.clip.encode_text(self.table.prompts(ft.real_template))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "discriminator"))
            self.disc = Discriminator(text_features.shape[-1], ft.d_hidden).to(self.device)
        self.disc_ddp = wrap(self.disc)

        self.lora_params = trainable_parameters(pipe.unet)
        self.g_opt = torch.optim.AdamW(self.lora_params, lr=ft.lr, betas=(0.9, 0.999), weight_decay=ft.weight_decay)
        self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=ft.d_lr, betas=(0.0, 0.999))
        self.scaler = self.precision.grad_scaler()
        self.uncond = encode_prompts(self.pipe, [""], self.device)  # (1, L, D): the empty negative prompt

    # ------------------------------------------------------------ pieces

    def _prompt_states(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        names = [self.table.names[i] for i in labels.tolist()]
        cond = encode_prompts(self.pipe, [self.cfg.finetune.prompt_template.format(name=n) for n in names], self.device)
        return cond, self.uncond.expand(len(names), -1, -1)

    def _latents(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return initial_latents(batch, self.pipe.unet, self.pipe.vae_scale_factor, self.cfg.model.resolution, generator, self.device)

    def _discriminator_step(self, labels: torch.Tensor, fake: torch.Tensor, generator: torch.Generator) -> dict:
        real_classes = draw_real_classes(labels, len(self.table), generator, self.cfg.finetune.exclude_own_class)
        real = self.real_features[real_classes.to(self.device)]
        self.d_opt.zero_grad(set_to_none=True)
        parts = discriminator_loss(self.disc_ddp, real, fake.detach())
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.cfg.finetune.d_grad_clip)
        self.d_opt.step()
        return {"loss_d": parts["loss"].item(), "d_acc_real": parts["d_acc_real"].item(), "d_acc_fake": parts["d_acc_fake"].item()}

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from the current generator, no graph."""
        cond, uncond = self._prompt_states(labels)
        with self.precision.autocast():
            return self.sampler(self._latents(len(labels), generator), cond, uncond, (), generator)

    # ------------------------------------------------------------ training

    def warmup_discriminator(self, progress: Callable[[dict], None] = lambda m: None) -> dict:
        """`d_warmup_passes` passes over the class table, D trained on frozen-generator images."""
        ft, n = self.cfg.finetune, len(self.table)
        chunk = ft.batch_size * self.world
        metrics: dict = {}
        for p in range(ft.d_warmup_passes):
            for b, start in enumerate(range(0, n, chunk)):
                # Wrap around the table's end so every rank takes the same number of D steps.
                rows = [(start + self.rank * ft.batch_size + j) % n for j in range(ft.batch_size)]
                labels = torch.tensor(rows)
                generator = seeded_generator(self.cfg.seed, "warmup", p, b, self.rank)
                features = self.clip.encode_image(self.generate(labels, generator))
                metrics = self._discriminator_step(labels, features, generator)
                progress(metrics)
        return metrics

    def train_step(self, step: int) -> dict:
        """One generator step then one discriminator step; returns the step's metrics."""
        ft = self.cfg.finetune
        started = time.perf_counter()
        labels = class_batch(step, self.rank, self.world, ft.batch_size, len(self.table), self.cfg.seed)
        generator = seeded_generator(self.cfg.seed, "step", step, self.rank)
        grad_indices = gradient_step_indices(ft.num_steps, ft.grad_steps, generator)
        cond, uncond = self._prompt_states(labels)
        latents = self._latents(len(labels), generator)

        with self.precision.autocast():
            images = self.sampler_ddp(latents, cond, uncond, grad_indices, generator)
            parts = self.loss_fn(images, labels.to(self.device), self.disc_ddp)
        self.g_opt.zero_grad(set_to_none=True)
        self.scaler.scale(parts["loss"]).backward()
        self.scaler.unscale_(self.g_opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, ft.grad_clip)
        self.scaler.step(self.g_opt)
        self.scaler.update()

        metrics = {k: parts[k].item() for k in ("loss", "loss_en", "loss_in", "loss_q", "clip_cos", "iqa_score")}
        metrics.update(self._discriminator_step(labels, parts["image_features"], generator))
        metrics.update(step=step + 1, grad_norm=float(grad_norm), step_time=time.perf_counter() - started)
        return metrics

    # ------------------------------------------------------------ state

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.pipe.unet).items()}

    def save(self, directory: Path, step: int) -> None:
        directory = Path(directory)
        save_file(self.lora_state_dict(), directory / ADAPTER_FILE)
        save_file({k: v.cpu().contiguous() for k, v in self.disc.state_dict().items()}, directory / DISC_FILE)
        torch.save({"g_opt": self.g_opt.state_dict(), "d_opt": self.d_opt.state_dict(), "scaler": self.scaler.state_dict()}, directory / OPTIM_FILE)
        (directory / STATE_FILE).write_text(json.dumps({"step": step}))

    def load(self, directory: Path) -> int:
        """Restore a checkpoint written by `save`; returns the number of steps done."""
        from peft.utils import set_peft_model_state_dict

        directory = Path(directory)
        set_peft_model_state_dict(self.pipe.unet, training.load_tensors(directory / ADAPTER_FILE, self.device))
        self.disc.load_state_dict(training.load_tensors(directory / DISC_FILE, self.device))
        optim = training.load_train_state(directory / OPTIM_FILE, self.device)
        self.g_opt.load_state_dict(optim["g_opt"])
        self.d_opt.load_state_dict(optim["d_opt"])
        self.scaler.load_state_dict(optim["scaler"])
        return int(json.loads((directory / STATE_FILE).read_text())["step"])

    def sample_grid(self) -> torch.Tensor:
        """One image per shown class from a fixed seed: comparable across steps and runs."""
        count = min(self.cfg.finetune.sample_classes, len(self.table))
        return self.generate(torch.arange(count), seeded_generator(self.cfg.seed, "samples"))


# ---------------------------------------------------------------- outputs


def save_grid(images: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().cpu(), path, nrow=min(GRID_COLUMNS, len(images)), padding=GRID_PADDING)


def sample_tile(step_dir: Path, class_id: str) -> Path:
    """Where one class's sample of a step lies: `step_dir/<class_id>.png` (the id %-quoted when it holds `/`, ...)."""
    return Path(step_dir) / f"{quote(class_id, safe='')}.png"


def save_samples(images: torch.Tensor, class_ids, samples_dir: Path, step: int) -> None:
    """The samples of `step`, images (B, 3, H, W) in [0, 1] of `class_ids[:B]`: one file per class in
    `samples_dir/step-NNNNNN/` (the report reads these) and the grid `step-NNNNNN.png` beside it."""
    from torchvision.utils import save_image

    name = f"step-{step:06d}"
    step_dir = Path(samples_dir) / name
    step_dir.mkdir(parents=True, exist_ok=True)
    images = images.float().cpu()
    for image, class_id in zip(images, class_ids):
        save_image(image, sample_tile(step_dir, class_id))
    save_grid(images, Path(samples_dir) / f"{name}.png")


def export_lora(adapter_file: Path, output: Path, ft: FinetuneConfig) -> Path:
    """Peft-format LoRA -> diffusers' `pytorch_lora_weights.safetensors` in `output`.

    The file's metadata carries the adapter's `LoraConfig` (rank, alpha, targets): without it,
    `load_lora_weights` assumes alpha = rank and scales the update by 1 instead of alpha / rank.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    state = convert_state_dict_to_diffusers(load_file(adapter_file))
    StableDiffusionPipeline.save_lora_weights(output, unet_lora_layers=state, safe_serialization=True,
                                              unet_lora_adapter_metadata=lora_config(ft).to_dict())
    return outputs.umask_mode(output / LORA_FILE)


# ---------------------------------------------------------------- Ray Train


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: restore or warm up, then train; checkpoint every `checkpoint_every` steps."""
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report chatter hides the progress bar
    cfg = from_dict(Config, config)
    ft = cfg.finetune
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(ft.cluster.cpus_per_worker)))
    finetuner = Finetuner(cfg, rank=rank, world=world, device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model)
    output = Path(ft.output)
    steps = total_steps(cfg, len(finetuner.table))

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            start = finetuner.load(Path(directory))
    log = MetricsLog(output / "metrics.jsonl", start, finetuner.precision.record()) if rank == 0 else None
    if log and start:  # one line per start from a checkpoint (a resumed run, a restarted worker): the restart history
        log.write({"phase": "resume", "resumed_from_step": start})
    if start == 0:
        if rank == 0:
            save_samples(finetuner.sample_grid(), finetuner.table.ids, output / "samples", 0)
        metrics = finetuner.warmup_discriminator()
        if log:
            log.write({"phase": "warmup", **metrics})

    for step in range(start, steps):
        metrics = finetuner.train_step(step)
        done = step + 1
        if log:
            log.write({**metrics, "resumed_from_step": start})
        if rank == 0 and (done == steps or (ft.sample_every and done % ft.sample_every == 0)):
            save_samples(finetuner.sample_grid(), finetuner.table.ids, output / "samples", done)
        if done == steps or done % ft.cluster.checkpoint_every == 0:
            training.report(metrics, partial(finetuner.save, step=done) if rank == 0 else None)
        faults.maybe_die(cfg.fault, "finetune.step")


def check_resumable(output: Path, cfg: Config) -> None:
    """Refuse to resume into `output` if it holds a run with different content-defining settings."""
    outputs.check_resumable(output, cfg, "finetune", ("classes", "seed", "model", "finetune"), RESUMABLE_FIELDS, "fine-tuning")


def check_quality_loss(cfg: Config) -> None:
    """Refuse an IQA metric whose score has no gradient to the pixels: its L_q would train nothing.

    Probed on the driver (2 small images). Metrics lbgen wraps itself (`SCORERS`: Q-Align, whose
    multi-billion-parameter model a driver should not load) are differentiable by construction.
    """
    model = cfg.model
    if cfg.finetune.lambda_q == 0 or model.iqa in SCORERS:
        return
    quality = create_iqa(model.iqa, seed=cfg.seed, trust_remote_code=model.trust_remote_code)
    if not has_pixel_gradient(quality):
        raise ConfigError(f"model.iqa {model.iqa!r}: its score carries no gradient to the pixels, so the quality loss "
                          "(finetune.lambda_q) would train nothing; choose a differentiable no-reference metric "
                          "(e.g. topiq_nr, musiq, qalign) or set --lambda-q 0")


def check_inputs(cfg: Config) -> ClassTable:
    """The class table; refuses, before any worker starts or anything is written, a bad table,
    generator, quality metric or output (a URI, a file, another run's directory)."""
    from lbgen.models.generator import check_generator

    require_local(cfg, "finetune")
    table = load_class_table(cfg.classes)
    check_generator(cfg.model.generator)
    check_quality_loss(cfg)
    output = Path(cfg.finetune.output).expanduser()
    outputs.check_output_dir(output, "finetune.output")
    if output.is_dir():
        check_resumable(output.resolve(), cfg)
    return table


def finetune(cfg: Config, table: ClassTable | None = None) -> Path:
    """Run (or resume) fine-tuning into `cfg.finetune.output`; returns that directory.

    `table`: what `check_inputs(cfg)` returned, when the caller has already checked (the
    quality metric is then built and probed once, not twice).

    Writes `pytorch_lora_weights.safetensors`, `discriminator.safetensors`,
    `config.yaml`, `metrics.jsonl`, `samples/` and Ray Train checkpoints.
    Ray is started locally by Ray Train if no cluster is attached.
    """
    table = table or check_inputs(cfg)  # here, before any worker starts
    output = Path(cfg.finetune.output).expanduser().resolve()
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, output=str(output)))
    with OutputLock(output):  # one writer per output
        (output / "config.yaml").write_text(to_yaml(cfg))

        def postfix(m: dict) -> str:
            return f"L={m['loss']:.3f} in={m['loss_in']:.3f} en={m['loss_en']:.3f} q={m['loss_q']:.3f} D={m['d_acc_real']:.2f}/{m['d_acc_fake']:.2f}"

        progress = MetricsProgress(output / "metrics.jsonl", total_steps(cfg, len(table)), "finetune", postfix=postfix)
        result = training.fit(train_loop_per_worker, dataclasses.asdict(cfg), cfg, "finetune", progress)
        with result.checkpoint.as_directory() as directory:
            export_lora(Path(directory) / ADAPTER_FILE, output, cfg.finetune)
            (output / DISC_FILE).write_bytes((Path(directory) / DISC_FILE).read_bytes())
    return output


def done_line(cfg: Config, output: Path) -> str:
    """What the CLI prints when fine-tuning is done."""
    return f"fine-tuned LoRA: {output / LORA_FILE}"


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds a finished fine-tuning (its LoRA is written last)."""
    return (Path(directory) / LORA_FILE).exists()
