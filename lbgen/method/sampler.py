"""Classifier-free-guidance sampling with truncated back-propagation (DESIGN 1.1-1.2).

Plain PyTorch over diffusers modules: the same `denoise` runs with no gradient
steps for generation and with K gradient steps for fine-tuning.
`sync_free.denoise_sync_free` is the same loop with no host round trip per step.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Sequence

import torch
from torch import nn

Generators = torch.Generator | Sequence[torch.Generator] | None


def gradient_step_indices(num_steps: int, grad_steps: int, generator: torch.Generator | None = None) -> list[int]:
    """K loop indices `{s, s + T//K, ..., s + (K-1)*T//K}` with `s ~ U[0, T - (T//K)*(K-1) - 1]`."""
    if not 0 < grad_steps <= num_steps:
        raise ValueError(f"need 0 < grad_steps <= num_steps, got K={grad_steps}, T={num_steps}")
    stride = num_steps // grad_steps
    start = int(torch.randint(0, num_steps - stride * (grad_steps - 1), (1,), generator=generator))
    return [start + j * stride for j in range(grad_steps)]


def initial_latents(batch: int, unet: nn.Module, vae_scale_factor: int, resolution: int, generator: Generators, device) -> torch.Tensor:
    """Unit Gaussian start noise (B, C, H/f, W/f); one generator per image makes each image batch-independent.
    `denoise` scales it to the sampler's first noise level."""
    from diffusers.utils.torch_utils import randn_tensor

    side = resolution // vae_scale_factor
    shape = (batch, unet.config.in_channels, side, side)
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], device) -> torch.Tensor:
    """(len(prompts), L, D) text-encoder states, padded/truncated to the tokenizer's context."""
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(device))[0]


def guidance_states(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """The text states of a CFG UNet call, (2B, L, D): the empty prompt's rows first, as `stacked_guided_noise`
    stacks the latents."""
    return torch.cat([uncond, cond])


def guided_noise(unet: nn.Module, latents: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """One CFG UNet call on the stacked [uncond, cond] batch: (B, C, h, w) noise prediction."""
    return stacked_guided_noise(unet, latents, t, guidance_states(cond, uncond), guidance)


def stacked_guided_noise(unet: nn.Module, latents: torch.Tensor, t, states: torch.Tensor, guidance: float) -> torch.Tensor:
    """`guided_noise` with its text states stacked beforehand (`guidance_states`): a loop stacks them once, not
    per step."""
    noise = unet(torch.cat([latents, latents]), t, encoder_hidden_states=states).sample
    noise_uncond, noise_cond = noise.chunk(2)
    return noise_uncond + guidance * (noise_cond - noise_uncond)


def denoise(
    unet: nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    num_steps: int,
    guidance: float,
    grad_indices: Iterable[int] = (),
    generator: Generators = None,
) -> torch.Tensor:
    """Run `num_steps` scheduler steps; only UNet calls at `grad_indices` record a graph.

    Scheduler updates from the first gradient step on stay differentiable, so the
    loss reaches every chosen step through the latents; UNet calls elsewhere run
    under no_grad (their outputs are constants to autograd).

    Args:
        latents: (B, C, h, w) unit start noise (`initial_latents`), scaled here by the sampler's
            `init_noise_sigma` once its timesteps are set: the Euler samplers' first sigma depends on the step count.
        cond, uncond: (B, L, D) text encoder states for the prompt and the empty prompt.
        generator: one generator, or one per image, for stochastic schedulers (DDPM).
    """
    grad_enabled = torch.is_grad_enabled()
    grad_indices = set(grad_indices) if grad_enabled else set()
    first_grad = min(grad_indices, default=num_steps)
    scheduler.set_timesteps(num_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    # Only the stochastic samplers' `step` takes a generator (PNDM's refuses one), as diffusers' pipelines pass it.
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i in grad_indices):
            model_in = scheduler.scale_model_input(latents, t)
            noise = guided_noise(unet, model_in, t, cond, uncond, guidance)
        with torch.set_grad_enabled(i >= first_grad):
            latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
    return latents


def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) in [0, 1], differentiable through the frozen VAE."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


class TrainableSampler(nn.Module):
    """UNet + VAE as one module whose forward samples and decodes.

    One forward per backward is what DDP's reducer expects, although the UNet is
    called T times inside it; wrapping this module (not the UNet) keeps DDP usable.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler, *, num_steps: int, guidance: float):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.guidance = guidance

    def forward(self, latents, cond, uncond, grad_indices: Sequence[int], generator: Generators = None) -> torch.Tensor:
        latents = denoise(
            self.unet,
            self.scheduler,
            latents,
            cond,
            uncond,
            num_steps=self.num_steps,
            guidance=self.guidance,
            grad_indices=grad_indices,
            generator=generator,
        )
        return decode(self.vae, latents)
