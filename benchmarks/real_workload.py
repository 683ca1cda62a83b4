"""Cost sheet of the paper's workload on the `sd15-shape` architectures, computed on a CPU.

What it measures (SD 1.5 UNet/VAE/text encoder and CLIP ViT-L/14 with random weights: the same
FLOPs and bytes as the real weights, which only change values, not shapes):

- generation: FLOPs per image at `--resolution` px and `--steps` DDPM steps with CFG (one UNet call
  on a batch of 2 per step), prompt encoding, VAE decode, and the scoring that `lbgen generate`
  does per image (CLIP image features at CLIP's 224 px, the IQA score);
- fine-tuning: FLOPs and peak memory of one `Finetuner.train_step` (per GPU worker) at `--batch`
  classes, K=`--grad-steps` of T=`--steps` steps recording a graph, LoRA on the paper's targets, in
  `--precision`, with and without gradient checkpointing; plus the discriminator step;
- pre-training: ResNet-50 train FLOPs per image at 224 px (forward + backward, counted);
- GPU-hours of the paper's ImageNet-1K run (preset `sd15-in1k`: its fine-tuning steps and workers
  with the discriminator's warm-up pass before them, 1.3 M images, 100 pre-training epochs) on an
  A100 and an H100 at `--utilization`, beside the public SD 1.5 generation speeds and the
  utilisation those speeds imply.

How: lbgen's own factories build the models on the meta device (no weights, no memory); they are
materialised as FakeTensors (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and
devices but no data) and run through lbgen's own sampler and losses, twice: `FlopCounterMode` counts
the FLOPs of what runs (matmuls, convolutions, attention; elementwise work is not counted), and in a
separate pass `torch.distributed._tools.mem_tracker.MemTracker` follows every tensor alive, so its peak is what
`torch.cuda.max_memory_allocated` would show (no allocator fragmentation; the tensors CPU kernels
keep for backward, which for these ops, flash attention included, match the CUDA ones). The fine-tuning step
mirrors `Finetuner.train_step`, whose own code cannot run on fake tensors (it reads values:
`.item()`, data-dependent timestep lookups); each run of consecutive no-gradient UNet calls is
simulated once (they free what they allocate) and its FLOPs counted per call.

The estimate is checked against a real `Finetuner.train_step` on this CPU at a small geometry
(128 px, B=1, K=1, T=2): the tensors alive before the step plus the peak of the
allocations torch's profiler records during it, against the estimator's peak at that geometry.

`--measure-step` instead runs ONE real `Finetuner.train_step` at 512 px, K=2 of T=4, gradient
checkpointing, `--precision`, LoRA r128 on the paper's targets, batch 1 (a CPU cannot hold more in
reasonable time), and reports wall time, peak RSS, the profiler's peak allocations, the estimator's
prediction for that geometry, and where the time went (UNet, VAE, CLIP, IQA; forward and backward).

    python benchmarks/real_workload.py --json /tmp/cost.json         # 512 px, 50 steps: ~5 min, 2 of them the check
    python benchmarks/real_workload.py --resolution 128 --steps 4    # quick: ~4 min on a busy 2-core machine
    nice -n 10 python benchmarks/real_workload.py --measure-step --json /tmp/step.json   # long: tens of minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import resource
import sys
import threading
import time
from types import SimpleNamespace

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # before diffusers/peft imports (ENVIRONMENT.md)

import psutil
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from lbgen.config import resolve
from lbgen.data.classes import load_class_table
from lbgen.method.losses import Discriminator, LbGenLoss, discriminator_loss
from lbgen.method.sampler import TrainableSampler, gradient_step_indices, guided_noise
from lbgen.models import create_clip, create_generator, create_iqa
from lbgen.runtime.seeds import seeded_generator
from lbgen.stages.finetune import Finetuner, lora_config, total_steps, trainable_parameters

GiB = 2**30
TERA = 1e12
# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts; fp16 is the same).
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12}
# Public SD 1.5 speeds at 512 px, 50 steps, fp16 (diffusers docs and benchmark READMEs; ENVIRONMENT.md).
PUBLIC_GEOMETRY = {"resolution": 512, "steps": 50}
PUBLIC_GENERATION = {
    "A100": (1.5, "batch 16, SDPA + torch.compile + channels_last"),
    "H100": (2.1, "batch 1, stable-fast"),
}
# The small geometry at which the estimate is checked against a real step on this CPU.
CHECK_GEOMETRY = {"resolution": 128, "batch": 1, "grad_steps": 1, "steps": 2}
# The geometry of --measure-step: the paper's resolution, as few steps as show the structure.
MEASURE_GEOMETRY = {"resolution": 512, "batch": 1, "grad_steps": 2, "steps": 4}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- FLOP counting

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _native_mha_flops(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's no-grad fast path (batch-first): qkv projection, attention, output projection."""
    batch, seq, _ = query
    projections = 2 * batch * seq * embed_dim * (3 * embed_dim + embed_dim)
    return projections + 2 * 2 * batch * seq * seq * embed_dim


# torch's counter knows the CUDA attention kernels; on CPU, SDPA and open_clip's no-grad attention
# run these ops instead, which it would count as zero.
EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    aten._native_multi_head_attention: _native_mha_flops,
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


def counted_flops(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------- models on fake tensors


class TraceableDDPM(DDPMScheduler):
    """diffusers' DDPM with its timesteps as Python ints, so that it runs on fake tensors.

    The stock scheduler finds the previous timestep with `nonzero()` and branches on tensor
    values, and iterating a tensor under FakeTensorMode yields fake scalars, which have no value;
    with ints, the arithmetic on the latents is unchanged and nothing asks for a value.
    """

    def set_timesteps(self, *args, **kwargs):
        with unset_fake_temporarily():
            super().set_timesteps(*args, **kwargs)
            self.timesteps = self.timesteps.tolist()
        self._previous = dict(zip(self.timesteps, self.timesteps[1:] + [-1]))

    def previous_timestep(self, timestep: int) -> int:
        return self._previous[timestep]


@dataclasses.dataclass(frozen=True)
class Precision:
    """Which dtype each model holds and what autocast runs, as a `Finetuner` sets them up."""

    autocast: torch.dtype | None
    generator: torch.dtype
    clip: torch.dtype
    iqa: torch.dtype

    @classmethod
    def of(cls, finetuner: Finetuner) -> Precision:
        def dtype(module):
            return next(p.dtype for p in module.parameters() if not p.requires_grad)

        return cls(finetuner.precision.dtype, dtype(finetuner.pipe.vae), dtype(finetuner.clip),
                   dtype(finetuner.quality))

    def describe(self) -> str:
        name = {None: "none", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return (f"autocast {name[self.autocast]}, generator weights {name[self.generator]}, "
                f"CLIP {name[self.clip]}, IQA {name[self.iqa]}, LoRA fp32")

    def autocast_context(self):
        return torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None)


def build_fake_models(cfg, precision: Precision) -> SimpleNamespace:
    """lbgen's generator (+ the Finetuner's LoRA), CLIP and IQA as fake tensors on the CPU device, and their mode."""
    ft = cfg.finetune
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.device("meta"):
        pipe = create_generator(cfg.model.generator, resolution=cfg.model.resolution, torch_dtype=precision.generator,
                                device="meta", seed=cfg.seed)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        pipe.unet.add_adapter(lora_config(ft))
        for p in trainable_parameters(pipe.unet):
            p.data = p.data.float()  # as Finetuner: LoRA trains in fp32 under autocast
        pipe.unet.train()
        clip = create_clip(cfg.model.clip, cfg.model.clip_pretrained, device="meta", seed=cfg.seed).to(precision.clip)
        quality = create_iqa(cfg.model.iqa, device="meta", seed=cfg.seed).to(precision.iqa)
    with fake_mode:
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, clip, quality):
            module.to_empty(device="cpu")
    return SimpleNamespace(pipe=pipe, clip=clip, quality=quality, scheduler_config=pipe.scheduler.config,
                           fake_mode=fake_mode)


def set_checkpointing(models: SimpleNamespace, enabled: bool) -> None:
    for module in (models.pipe.unet, models.pipe.vae):
        module.enable_gradient_checkpointing() if enabled else module.disable_gradient_checkpointing()


class FrozenAwareMemTracker(MemTracker):
    """torch's MemTracker, except that it hooks gradients only of parameters that require them, and
    keeps the global peak only, with where it was reached (`peak_at`: the phase and the innermost
    module running, as torch's ModTracker sees it; in the backward pass that module is approximate).

    torch's registers a gradient hook on every parameter a module holds, which a frozen parameter
    (all of SD's and CLIP's here) refuses with an error; and after every op it updates each tracked
    module's own peak, a loop over the UNet's ~1000 modules that took 90% of the run time.
    """

    peak_at = ""

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)
                self.peak_at = self._where()

    def _where(self) -> str:
        if self._in_opt:
            return "optimiser step"
        innermost = max(self._mod_tracker.parents, key=lambda name: name.count("."))
        return f"{'backward' if self._mod_tracker.is_bw else 'forward'}, in {innermost}"

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and param not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._track_gradient),
                        param.register_post_accumulate_grad_hook(lambda p: self._track_gradient(p.grad)),
                    )
        return memory

    def _track_gradient(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)


def prompt_states(models: SimpleNamespace, batch: int) -> torch.Tensor:
    """(batch, 77, 768) text-encoder states of `batch` prompts (token ids do not change the cost)."""
    ids = torch.zeros(batch, models.pipe.tokenizer.model_max_length, dtype=torch.long)
    return models.pipe.text_encoder(ids)[0]


# ---------------------------------------------------------------- generation


def generation_flops(models: SimpleNamespace, cfg, steps: int) -> dict[str, float]:
    """FLOPs per generated and scored image, by part (GenerateBatch's sampling + ScoreBatch's scoring).

    The LoRA adapter is switched off: GenerateBatch fuses it into the weights, so it costs nothing there.
    """
    side = cfg.model.resolution
    latent_side = side // models.pipe.vae_scale_factor
    unet = models.pipe.unet
    unet.disable_adapters()
    with models.fake_mode, torch.no_grad():
        cond = prompt_states(models, 1)
        latents = torch.randn(1, unet.config.in_channels, latent_side, latent_side, dtype=unet.dtype)
        images = torch.rand(1, 3, side, side)
        flops = {
            "text_encoder": counted_flops(lambda: prompt_states(models, 1)),
            "unet": steps * counted_flops(lambda: guided_noise(unet, latents, 500, cond, cond, cfg.generate.guidance)),
            "vae_decode": counted_flops(lambda: models.pipe.vae.decode(latents.to(models.pipe.vae.dtype))),
            "clip_score": counted_flops(lambda: models.clip.encode_image(images)),
            "iqa_score": counted_flops(lambda: models.quality(images)),
        }
    unet.enable_adapters()
    return flops


# ---------------------------------------------------------------- fine-tuning step


def collapsed_schedule(num_steps: int, grad_indices: list[int]) -> tuple[int, list[int], int]:
    """The step's UNet calls with each run of consecutive no-gradient calls merged into one.

    A no-gradient call frees everything it allocates, so one call per run reaches the same peak
    as the whole run. Returns (simulated steps, their gradient indices, no-gradient calls left out).
    """
    kinds: list[bool] = []  # True: records a graph
    for i in range(num_steps):
        grad = i in grad_indices
        if grad or not kinds or kinds[-1]:
            kinds.append(grad)
    return len(kinds), [i for i, grad in enumerate(kinds) if grad], num_steps - len(kinds)


class SimulatedStep:
    """The work of one `Finetuner.train_step` on fake models: its sampler, losses, discriminator and optimisers.

    Built fresh for each pass, so that no pass starts with another's gradients or optimiser state.
    """

    def __init__(self, models: SimpleNamespace, cfg, precision: Precision, sim_steps: int, sim_indices: list[int]):
        ft = cfg.finetune
        self.models, self.cfg, self.precision, self.sim_indices = models, cfg, precision, sim_indices
        unet, clip = models.pipe.unet, models.clip
        self.sampler = TrainableSampler(unet, models.pipe.vae, TraceableDDPM.from_config(models.scheduler_config),
                                        num_steps=sim_steps, guidance=ft.guidance)
        classes = len(load_class_table(cfg.classes))
        self.lora = trainable_parameters(unet)
        for p in self.lora:
            p.grad = None
        with models.fake_mode:
            self.text_features = F.normalize(torch.randn(classes, clip.embed_dim), dim=-1)
            self.real_features = F.normalize(torch.randn(classes, clip.embed_dim), dim=-1)
            self.loss_fn = LbGenLoss(clip, models.quality, self.text_features,
                                     w_en=ft.w_en, w_in=ft.w_in, lambda_q=ft.lambda_q)
            self.disc = Discriminator(clip.embed_dim, ft.d_hidden)
            self.g_opt = torch.optim.AdamW(self.lora, lr=ft.lr, weight_decay=ft.weight_decay)
            self.d_opt = torch.optim.AdamW(self.disc.parameters(), lr=ft.d_lr, betas=(0.0, 0.999))
            self.uncond = prompt_states(models, 1)

    def resident(self) -> tuple:
        """What a Finetuner holds between steps (its optimiser state appears during the first step)."""
        pipe = self.models.pipe
        return (pipe.unet, pipe.vae, pipe.text_encoder, self.models.clip, self.models.quality, self.disc,
                self.text_features, self.real_features, self.uncond, self.g_opt, self.d_opt)

    def generator_step(self) -> torch.Tensor:
        """Sample with K graph-recording steps, decode, losses, backward, clip, AdamW; returns the image features."""
        ft, unet = self.cfg.finetune, self.models.pipe.unet
        side = self.cfg.model.resolution // self.models.pipe.vae_scale_factor
        cond = prompt_states(self.models, ft.batch_size)
        latents = torch.randn(ft.batch_size, unet.config.in_channels, side, side)
        self.labels = torch.zeros(ft.batch_size, dtype=torch.long)
        with self.precision.autocast_context():
            images = self.sampler(latents, cond, self.uncond.expand(ft.batch_size, -1, -1), self.sim_indices, None)
            parts = self.loss_fn(images, self.labels, self.disc)
        self.g_opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.lora, ft.grad_clip)
        self.g_opt.step()
        return parts["image_features"]

    def discriminator_step(self, image_features: torch.Tensor) -> None:
        self.d_opt.zero_grad(set_to_none=True)
        discriminator_loss(self.disc, self.real_features[self.labels], image_features.detach())["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.cfg.finetune.d_grad_clip)
        self.d_opt.step()


def estimate_train_step(models: SimpleNamespace, cfg, precision: Precision, checkpointing: bool) -> dict:
    """FLOPs (by part) and peak bytes of one `Finetuner.train_step` (generator step + D step), on fake tensors.

    Memory and FLOPs are taken in two passes: under FlopCounterMode, activations recomputed in the
    backward stay alive longer than they do in a plain run (its module tracking holds them), which
    raised the estimate of a real 512 px step by 40%.
    """
    ft = cfg.finetune
    set_checkpointing(models, checkpointing)
    # Step 0's draw, as train_step makes it.
    grad_indices = gradient_step_indices(ft.num_steps, ft.grad_steps, seeded_generator(cfg.seed, "step", 0, 0))
    sim_steps, sim_indices, skipped = collapsed_schedule(ft.num_steps, grad_indices)
    with models.fake_mode:
        step = SimulatedStep(models, cfg, precision, sim_steps, sim_indices)
        tracker = FrozenAwareMemTracker()
        tracker.track_external(*step.resident())
        resident = tracker.get_tracker_snapshot()[torch.device("cpu")][_TOTAL_KEY]
        with tracker:
            features = step.generator_step()
            # D runs again as a root module, which MemTracker takes for a new iteration unless its
            # per-module stats are cleared; the totals and the peak so far are kept.
            tracker.reset_mod_stats()
            step.discriminator_step(features)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]

        step = SimulatedStep(models, cfg, precision, sim_steps, sim_indices)
        with flop_counter() as counter:
            step.discriminator_step(step.generator_step())
        nograd_call = unet_call_flops(models, cfg, precision)
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = counter.get_total_flops() + skipped * nograd_call
    # Per part by FlopCounterMode's module attribution. CLIP and IQA read the same images, so their
    # backward passes cannot be told apart this way: they are reported together, as LbGenLoss.
    sampler_name = type(step.sampler).__name__
    unet_name = f"{sampler_name}.unet"
    parts = {
        "unet (T-K no-grad calls; K calls fwd+bwd)": flops.get(unet_name, 0) + skipped * nograd_call,
        "vae decode fwd+bwd": flops.get(sampler_name, 0) - flops.get(unet_name, 0),
        "clip + iqa fwd+bwd (LbGenLoss)": flops.get(type(step.loss_fn).__name__, 0),
        "text encoder (prompts)": flops.get(type(models.pipe.text_encoder).__name__, 0),
    }
    parts["other (discriminator, optimisers)"] = total - sum(parts.values())
    return {
        "checkpointing": checkpointing,
        "grad_indices": grad_indices,
        "flops": total,
        "flops_parts": parts,
        "resident_bytes": resident,
        "peak_bytes": peak[_TOTAL_KEY],
        "peak_at": tracker.peak_at,
        "peak_breakdown_bytes": {kind.value: size for kind, size in peak.items() if kind != _TOTAL_KEY},
    }


def unet_call_flops(models: SimpleNamespace, cfg, precision: Precision) -> int:
    """FLOPs of one no-gradient CFG UNet call on the fine-tuning batch (inside the fake mode)."""
    unet, batch = models.pipe.unet, cfg.finetune.batch_size
    side = cfg.model.resolution // models.pipe.vae_scale_factor
    with torch.no_grad(), precision.autocast_context():
        latents = torch.randn(batch, unet.config.in_channels, side, side)
        states = prompt_states(models, batch)
        return counted_flops(lambda: guided_noise(unet, latents, 500, states, states, cfg.finetune.guidance))


# ---------------------------------------------------------------- real step on this CPU


def resident_bytes(*objects) -> int:
    """Bytes of the distinct storages of the modules' parameters and buffers and of the tensors given."""
    seen, total = set(), 0
    for obj in objects:
        tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, torch.nn.Module) else [obj]
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def finetuner_resident_bytes(finetuner: Finetuner) -> int:
    """What a Finetuner holds between steps (models, text tables, the empty prompt), before optimiser state."""
    return resident_bytes(finetuner.pipe.unet, finetuner.pipe.vae, finetuner.pipe.text_encoder, finetuner.clip,
                          finetuner.quality, finetuner.disc, finetuner.loss_fn.text_features,
                          finetuner.real_features, finetuner.uncond)


def profiler_peak_bytes(prof) -> int:
    """Peak of the bytes allocated during the profile, net of frees, from the profiler's allocation records.

    The running sum of the records, in time order: their `total_allocated` field carries over what
    an earlier profile in the same process allocated and never freed, so it is not used.
    """
    from torch._C._profiler import _EventType

    records, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            records.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    peak = allocated = 0
    for _, size in sorted(records):
        allocated += size
        peak = max(peak, allocated)
    return peak


def finetune_config(geometry: dict, precision: str, classes: str | None = None):
    """Preset sd15-shape at `geometry`, gradient checkpointing on; train_step is called directly, so no D warm-up."""
    overrides = {
        "model": {"resolution": geometry["resolution"]},
        "finetune": {"batch_size": geometry["batch"], "grad_steps": geometry["grad_steps"],
                     "num_steps": geometry["steps"], "cluster": {"mixed_precision": precision}, "gradient_checkpointing": True,
                     "d_warmup_passes": 0},
    }
    if classes:
        overrides["classes"] = classes
    return resolve("sd15-shape", overrides=overrides)


def real_step(cfg, timer_factory=None) -> dict:
    """One real `Finetuner.train_step(0)` on this CPU under torch's profiler (memory on)."""
    from torch.profiler import ProfilerActivity, profile

    log(f"building Finetuner (sd15-shape, {cfg.model.resolution} px, B={cfg.finetune.batch_size}, "
        f"K={cfg.finetune.grad_steps} of T={cfg.finetune.num_steps}, {cfg.finetune.cluster.mixed_precision})")
    finetuner = Finetuner(cfg, device="cpu")
    resident = finetuner_resident_bytes(finetuner)
    timer = timer_factory(finetuner) if timer_factory else None
    rss = RssSampler()
    log("running one train_step")
    with rss, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        started = time.perf_counter()
        metrics = finetuner.train_step(0)
        wall = time.perf_counter() - started
    peak_delta = profiler_peak_bytes(prof)
    return {
        "precision": Precision.of(finetuner),
        "wall_s": wall,
        "resident_bytes": resident,
        "profiler_peak_delta_bytes": peak_delta,
        "measured_peak_bytes": resident + peak_delta,
        "rss_peak_bytes": rss.peak,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "finite_loss": math.isfinite(metrics["loss"]),
        "parts_s": timer.parts(wall) if timer else None,
    }


class RssSampler:
    """Peak resident set size of this process, sampled every 0.2 s in a thread while in the `with` block."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        process = psutil.Process()
        while True:
            self.peak = max(self.peak, process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class PartTimer:
    """Where one train_step's time goes, from hooks on the Finetuner's modules (no change to lbgen).

    Forward: pre/post hooks on the UNet (calls with and without a graph), the VAE decoder, CLIP's
    image tower and the IQA network. Backward: the autograd engine runs ready nodes latest-created
    first, so it goes through IQA's branch, then CLIP's (and the losses'), then the VAE, then the
    UNet chain. Gradient hooks mark when each stretch starts: the first gradient at the IQA output,
    at CLIP's output, at the VAE decoder's output, at the VAE's input; the last LoRA gradient ends it.
    """

    def __init__(self, finetuner: Finetuner):
        self.forward: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self._started: dict[str, float] = {}
        vae = finetuner.pipe.vae
        self._time_forward(finetuner.pipe.unet, finetuner.pipe.unet, "unet")
        self._time_forward(finetuner.clip.model.visual, finetuner.clip.model.visual, "clip")
        self._time_forward(finetuner.quality.metric, finetuner.quality.metric, "iqa")
        self._time_forward(vae.post_quant_conv, vae.decoder, "vae")
        vae.post_quant_conv.register_forward_pre_hook(lambda module, args: self._mark_on_grad(args[0], "vae.in"))
        for p in finetuner.lora_params:
            p.register_post_accumulate_grad_hook(lambda _: self._mark("lora grads", last=True))

    def _time_forward(self, first, last, part: str) -> None:
        """Time from `first`'s forward start to `last`'s forward end; mark `part.out`'s first gradient."""

        def start(module, args):
            self._started[part] = time.perf_counter()

        def stop(module, args, output):
            key = f"{part} fwd" + ((" (graph)" if torch.is_grad_enabled() else " (no grad)") if part == "unet" else "")
            self.forward[key] = self.forward.get(key, 0.0) + time.perf_counter() - self._started[part]
            self._mark_on_grad(output.sample if hasattr(output, "sample") else output, f"{part}.out")

        first.register_forward_pre_hook(start)
        last.register_forward_hook(stop)

    def _mark_on_grad(self, tensor, name: str) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(lambda grad: self._mark(name))

    def _mark(self, name: str, last: bool = False) -> None:
        """Record when `name` happens: the first time, or with `last` the latest (a hook must return None)."""
        if last or name not in self.marks:
            self.marks[name] = time.perf_counter()

    def parts(self, wall: float) -> dict[str, float]:
        """Seconds per part; the remainder (prompts, schedulers, losses, optimisers, D step) is 'other'."""
        m = self.marks
        parts = {
            **self.forward,
            "iqa bwd": m["clip.out"] - m["iqa.out"],
            "clip bwd (incl. resize to 224)": m["vae.out"] - m["clip.out"],
            "vae bwd": m["vae.in"] - m["vae.out"],
            "unet bwd (incl. recompute, scheduler chain)": m["lora grads"] - m["vae.in"],
        }
        parts["other"] = wall - sum(parts.values())
        return parts


# ---------------------------------------------------------------- pre-training


def train_flops_per_image(model_name: str, image_size: int) -> dict[str, int]:
    """Forward and forward+backward FLOPs of one image through a timm model (counted, fake tensors)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        model.to_empty(device="cpu").train()
        images = torch.randn(1, 3, image_size, image_size)
        forward = counted_flops(lambda: model(images))
        train = counted_flops(lambda: model(images).sum().backward())
    return {"forward": forward, "train": train}


# ---------------------------------------------------------------- GPU-hours


def gpu_hours(flops: float, peak: float, utilization: float) -> float:
    return flops / (peak * utilization) / 3600


def paper_run_hours(paper, gen: dict[str, float], step_flops: float, pretrain_flops: float, utilization: float) -> dict:
    """GPU-hours per stage of the paper's ImageNet-1K run, per GPU type, at one model-FLOPs utilisation.

    `gen`: generation FLOPs per image by part. The discriminator's warm-up before the first step
    samples `finetune_batch` images per D step with the frozen generator and embeds them with CLIP.
    """
    warmup_images = paper["d_warmup_steps"] * paper["finetune_workers"] * paper["finetune_batch"]
    warmup_flops = warmup_images * (gen["text_encoder"] + gen["unet"] + gen["vae_decode"] + gen["clip_score"])
    hours = {}
    for gpu, peak in GPU_PEAK_FLOPS.items():
        stages = {
            "finetune": gpu_hours(paper["finetune_steps"] * paper["finetune_workers"] * step_flops, peak, utilization),
            "finetune_d_warmup": gpu_hours(warmup_flops, peak, utilization),
            "generate": gpu_hours(paper["images"] * sum(gen.values()), peak, utilization),
            "pretrain": gpu_hours(paper["pretrain_epochs"] * paper["pretrain_images"] * pretrain_flops, peak,
                                  utilization),
        }
        hours[gpu] = {**stages, "total": sum(stages.values())}
    return hours


def paper_run(batch: int) -> dict:
    """The paper's ImageNet-1K run as preset `sd15-in1k` sets it, at `batch` classes per worker and step."""
    cfg = resolve("sd15-in1k", overrides={"finetune": {"batch_size": batch}})
    ft = cfg.finetune
    classes = len(load_class_table(cfg.classes))
    images = classes * cfg.generate.images_per_class
    return {
        "finetune_steps": total_steps(cfg, classes),
        "finetune_workers": ft.cluster.workers,
        "finetune_batch": ft.batch_size,
        "d_warmup_steps": ft.d_warmup_passes * math.ceil(classes / (ft.batch_size * ft.cluster.workers)),
        "images": images,
        "pretrain_images": round(images * (1 - cfg.pretrain.val_fraction)),
        "pretrain_epochs": cfg.pretrain.epochs,
        "pretrain_model": cfg.pretrain.model,
        "pretrain_image_size": cfg.pretrain.image_size,
    }


def public_generation(paper: dict, diffusion_flops: float) -> dict:
    """Public SD 1.5 speeds: the GPU-hours they give for the paper's images and the utilisation they imply."""
    return {
        gpu: {
            "images_per_s": rate, "setting": setting,
            "generate_gpu_hours": paper["images"] / rate / 3600,
            "implied_utilization": rate * diffusion_flops / GPU_PEAK_FLOPS[gpu],
        }
        for gpu, (rate, setting) in PUBLIC_GENERATION.items()
    }


# ---------------------------------------------------------------- the two modes


def memory_check(args) -> dict:
    """The estimator against a real step at CHECK_GEOMETRY; also yields the Finetuner's precision policy."""
    cfg = finetune_config(CHECK_GEOMETRY, args.precision)
    real = real_step(cfg)
    precision = real["precision"]
    log(f"real step: {real['wall_s']:.1f} s; estimating the same step on fake tensors ({precision.describe()})")
    estimate = estimate_train_step(build_fake_models(cfg, precision), cfg, precision, checkpointing=True)
    return {
        "geometry": CHECK_GEOMETRY,
        "precision": precision,
        "estimate_gib": estimate["peak_bytes"] / GiB,
        "measured_gib": real["measured_peak_bytes"] / GiB,
        "measured_resident_gib": real["resident_bytes"] / GiB,
        "measured_step_delta_gib": real["profiler_peak_delta_bytes"] / GiB,
        "ratio_estimate_over_measured": estimate["peak_bytes"] / real["measured_peak_bytes"],
        "estimate_step_delta_gib": (estimate["peak_bytes"] - estimate["resident_bytes"]) / GiB,
        "ratio_step_delta": (estimate["peak_bytes"] - estimate["resident_bytes"]) / real["profiler_peak_delta_bytes"],
    }


def cost_sheet(args) -> dict:
    check = memory_check(args)
    precision = check.pop("precision")
    geometry = {"resolution": args.resolution, "batch": args.batch, "grad_steps": args.grad_steps, "steps": args.steps}
    cfg = finetune_config(geometry, args.precision, classes="imagenet1k")
    log(f"building fake sd15-shape models at {args.resolution} px")
    models = build_fake_models(cfg, precision)
    log("counting generation FLOPs")
    gen = generation_flops(models, cfg, args.steps)
    steps = {}
    for checkpointing in (True, False):
        log(f"estimating the fine-tuning step, gradient checkpointing {'on' if checkpointing else 'off'}")
        steps[checkpointing] = estimate_train_step(models, cfg, precision, checkpointing)
    paper = paper_run(args.batch)
    log(f"counting {paper['pretrain_model']} train FLOPs")
    pretrain = train_flops_per_image(paper["pretrain_model"], paper["pretrain_image_size"])
    gen_total = sum(gen.values())
    diffusion = gen["text_encoder"] + gen["unet"] + gen["vae_decode"]
    return {
        **run_header(geometry, precision),
        "utilization": args.utilization,
        "generate_tflops_per_image": gen_total / TERA,
        "generate_tflops_parts": {k: v / TERA for k, v in gen.items()},
        "finetune_tflops_per_step": steps[True]["flops"] / TERA,
        "finetune_tflops_per_step_no_checkpointing": steps[False]["flops"] / TERA,
        "finetune_tflops_parts": {k: v / TERA for k, v in steps[True]["flops_parts"].items()},
        "finetune_grad_indices": steps[True]["grad_indices"],
        "finetune_peak_gib": steps[True]["peak_bytes"] / GiB,
        "finetune_peak_gib_no_checkpointing": steps[False]["peak_bytes"] / GiB,
        "finetune_peak_at": steps[True]["peak_at"],
        "finetune_peak_at_no_checkpointing": steps[False]["peak_at"],
        "finetune_peak_breakdown_gib": {k: v / GiB for k, v in steps[True]["peak_breakdown_bytes"].items()},
        "finetune_peak_breakdown_gib_no_checkpointing": {
            k: v / GiB for k, v in steps[False]["peak_breakdown_bytes"].items()},
        "memory_check": check,
        "pretrain_gflops_per_image": {k: v / 1e9 for k, v in pretrain.items()},
        "paper_run": paper,
        "gpu_peak_tflops": {k: v / TERA for k, v in GPU_PEAK_FLOPS.items()},
        "gpu_hours": paper_run_hours(paper, gen, steps[True]["flops"], pretrain["train"], args.utilization),
        # Only comparable at the geometry the public figures were taken at.
        "public_generation": public_generation(paper, diffusion)
        if (args.resolution, args.steps) == tuple(PUBLIC_GEOMETRY.values()) else None,
    }


def run_header(geometry: dict, precision) -> dict:
    """What every JSON document of this script starts with: when, with what, how it was called."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "geometry": geometry,
        "precision": precision.describe(),
    }


def measure_step(args) -> dict:
    """One real train_step at MEASURE_GEOMETRY, with the estimator's prediction for it beside."""
    cfg = finetune_config(MEASURE_GEOMETRY, args.precision)
    real = real_step(cfg, timer_factory=PartTimer)
    precision = real.pop("precision")
    log("estimating the same step on fake tensors")
    estimate = estimate_train_step(build_fake_models(cfg, precision), cfg, precision, checkpointing=True)
    parts = real["parts_s"]
    by_model: dict[str, float] = {}
    for part, seconds in parts.items():  # "vae fwd", "vae bwd" -> "vae"
        by_model[part.split()[0]] = by_model.get(part.split()[0], 0.0) + seconds
    return {
        **run_header(MEASURE_GEOMETRY, precision),
        "threads": torch.get_num_threads(),
        "wall_s": real["wall_s"],
        "rss_peak_gib": real["rss_peak_bytes"] / GiB,
        "maxrss_gib": real["maxrss_bytes"] / GiB,
        "profiler_peak_gib": real["profiler_peak_delta_bytes"] / GiB,
        "resident_gib": real["resident_bytes"] / GiB,
        "measured_peak_gib": real["measured_peak_bytes"] / GiB,
        "estimated_peak_gib": estimate["peak_bytes"] / GiB,
        "ratio_estimate_over_measured": estimate["peak_bytes"] / real["measured_peak_bytes"],
        "finite_loss": real["finite_loss"],
        "parts_s": parts,
        "dominant_part": max(parts, key=parts.get),
        "seconds_by_model": by_model,
        "dominant_model": max(by_model, key=by_model.get),
    }


# ---------------------------------------------------------------- output


def print_cost_sheet(r: dict) -> None:
    g = r["geometry"]
    print(f"Cost sheet, sd15-shape, {g['resolution']} px; torch {r['torch']}; {r['precision']}")
    print(f"\nGeneration, per image ({g['steps']} DDPM steps, CFG = 2 UNet passes per step):")
    for part, tflops in r["generate_tflops_parts"].items():
        print(f"  {part:<14} {tflops:10.3f} TFLOPs")
    print(f"  {'total':<14} {r['generate_tflops_per_image']:10.3f} TFLOPs/image")
    print(f"\nFine-tuning step per worker (B={g['batch']}, K={g['grad_steps']} of T={g['steps']}, grad indices "
          f"{r['finetune_grad_indices']}):")
    for part, tflops in r["finetune_tflops_parts"].items():
        print(f"  {part:<45} {tflops:10.2f} TFLOPs")
    print(f"  {'total, checkpointing on / off':<45} {r['finetune_tflops_per_step']:10.2f} / "
          f"{r['finetune_tflops_per_step_no_checkpointing']:.2f} TFLOPs")
    print(f"  peak memory, checkpointing on / off: {r['finetune_peak_gib']:.2f} / "
          f"{r['finetune_peak_gib_no_checkpointing']:.2f} GiB")
    for label, suffix in (("on", ""), ("off", "_no_checkpointing")):
        breakdown = r["finetune_peak_breakdown_gib" + suffix]
        print(f"    checkpointing {label}: reached in {r['finetune_peak_at' + suffix]}; (GiB) "
              + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items() if v >= 0.005))
    c = r["memory_check"]
    print(f"\nMemory check, real Finetuner.train_step on this CPU at {c['geometry']}:")
    print(f"  measured {c['measured_gib']:.3f} GiB (resident {c['measured_resident_gib']:.3f} + step peak "
          f"{c['measured_step_delta_gib']:.3f}), estimated {c['estimate_gib']:.3f} GiB: "
          f"ratio {c['ratio_estimate_over_measured']:.3f}")
    print(f"  the step's own peak above what is resident: measured {c['measured_step_delta_gib']:.3f} GiB, estimated "
          f"{c['estimate_step_delta_gib']:.3f} GiB: ratio {c['ratio_step_delta']:.3f}")
    p = r["pretrain_gflops_per_image"]
    print(f"\nPre-training {r['paper_run']['pretrain_model']}: {p['forward']:.2f} GFLOPs forward, "
          f"{p['train']:.2f} GFLOPs "
          f"forward+backward per image (x{p['train'] / p['forward']:.2f})")
    run = r["paper_run"]
    print(f"\nGPU-hours of the paper's run ({run['finetune_steps']} steps x {run['finetune_workers']} GPUs after "
          f"{run['d_warmup_steps']} D warm-up steps, {run['images']:,} images, {run['pretrain_epochs']} epochs x "
          f"{run['pretrain_images']:,}) at {r['utilization']:.0%} of the bf16 dense peak:")
    print(f"  {'GPU':<6} {'finetune':>9} {'D warm-up':>9} {'generate':>9} {'pretrain':>9} {'total':>9}")
    for gpu, h in r["gpu_hours"].items():
        print(f"  {gpu:<6} {h['finetune']:9.2f} {h['finetune_d_warmup']:9.2f} {h['generate']:9.1f} "
              f"{h['pretrain']:9.1f} "
              f"{h['total']:9.1f}")
    print("\nPublic SD 1.5 speeds (512 px, 50 steps, fp16) for the same images:")
    if r["public_generation"] is None:
        print(f"  not compared: this sheet is for {g['resolution']} px, {g['steps']} steps")
        return
    for gpu, pub in r["public_generation"].items():
        print(f"  {gpu}: {pub['images_per_s']} images/s ({pub['setting']}): {pub['generate_gpu_hours']:.1f} GPU-hours; "
              f"implies {pub['implied_utilization']:.0%} utilisation")


def print_measured_step(r: dict) -> None:
    g = r["geometry"]
    print(f"One real Finetuner.train_step on CPU ({r['threads']} threads): sd15-shape, {g['resolution']} px, "
          f"batch {g['batch']}, "
          f"K={g['grad_steps']} of T={g['steps']}, gradient checkpointing, LoRA r128; {r['precision']}")
    print(f"  wall {r['wall_s']:.1f} s; peak RSS {r['rss_peak_gib']:.2f} GiB (sampled), "
          f"maxrss {r['maxrss_gib']:.2f} GiB")
    print(f"  profiler: peak allocations during the step {r['profiler_peak_gib']:.2f} GiB over "
          f"{r['resident_gib']:.2f} GiB "
          f"resident = {r['measured_peak_gib']:.2f} GiB; estimator {r['estimated_peak_gib']:.2f} GiB "
          f"(ratio {r['ratio_estimate_over_measured']:.3f}); finite loss: {r['finite_loss']}")
    for part, seconds in sorted(r["parts_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {part:<44} {seconds:8.1f} s  {seconds / r['wall_s']:6.1%}")
    print("  by model: " + ", ".join(f"{model} {seconds / r['wall_s']:.0%}" for model, seconds in
                                     sorted(r["seconds_by_model"].items(), key=lambda kv: -kv[1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=50, help="DDPM steps T, for generation and fine-tuning")
    parser.add_argument("--batch", type=int, default=4, help="classes per fine-tuning worker per step (B)")
    parser.add_argument("--grad-steps", type=int, help="fine-tuning steps that record a graph (K); default: 5 "
                        "(the paper's), or --steps if fewer")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"], help="finetune.cluster.mixed_precision")
    parser.add_argument("--utilization", type=float, default=0.35,
                        help="model-FLOPs utilisation assumed for GPU-hours: the public A100 SD 1.5 figure implies "
                             "~0.4 for generation at batch 16; LoRA training with recomputation and small batches "
                             "typically reaches 0.3-0.4")
    parser.add_argument("--measure-step", action="store_true",
                        help="instead: run one real train_step at 512 px, K=2 of T=4, batch 1 on this CPU (long)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    args.grad_steps = args.grad_steps or min(5, args.steps)

    result = measure_step(args) if args.measure_step else cost_sheet(args)
    (print_measured_step if args.measure_step else print_cost_sheet)(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
