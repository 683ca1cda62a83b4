"""Counting the paper's workload on fake tensors: FLOPs and peak memory of lbgen's own models, sampler and losses.

lbgen's factories build the `sd15-shape` models on the meta device; they are materialised as
FakeTensors (shapes, dtypes and devices but no data) and run through lbgen's own sampler and losses:
`FlopCounterMode` counts the FLOPs of what runs (matmuls, convolutions, attention), and
`MemTracker` follows every tensor alive, so its peak is what `torch.cuda.max_memory_allocated`
would show. The fine-tuning step is simulated (`SimulatedStep`), mirroring `Finetuner.train_step`,
whose own code reads values and cannot run on fake tensors. The report and CLI: `real_workload.py`.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from lbgen.data.classes import load_class_table
from lbgen.method.losses import Discriminator, LbGenLoss, discriminator_loss
from lbgen.method.sampler import TrainableSampler, gradient_step_indices, guided_noise
from lbgen.models import create_clip, create_generator, create_iqa
from lbgen.runtime.seeds import seeded_generator
from lbgen.stages.finetune import Finetuner, lora_config, trainable_parameters


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
