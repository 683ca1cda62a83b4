"""A denoising loop with no host round trip per step (issue 26): the ground for CUDA graphs.

diffusers' `scheduler.step` works on the host each step: DDPM finds the previous timestep with `nonzero` and
branches on `if t > 0`, DDIM on `prev_timestep >= 0` (each a GPU sync), Euler compares a sigma in Python, and
the Euler samplers pass each step's sigma as a CPU scalar (a kernel argument that a captured CUDA graph
would freeze). Here the same arithmetic is split in two:

* before the loop (`plan_steps`), each step's scheduler coefficients become (T,) float32 tensors on the
  latents' device, and each step's variance noise is drawn from the caller's generators in the order
  diffusers' steps would draw it (so the generators end in the same state, and results equal `denoise`);
* the loop (`StepPlan.run`) indexes those tables with a Python int: a UNet call and a few tensor
  operations per step, no `.item()`, no device->host copy, no branch on a tensor's value; the text states
  are stacked for guidance once, before the first step.

Each step reads only `plan.timesteps[i]`, `plan.coefficients(i)` and `plan.noise[i]`; copying those rows
into static buffers lets one captured CUDA graph (UNet + update) replay every step.

Samplers not in SYNC_FREE (PNDM and DPM++ keep multistep state), and configs outside a sampler's scope
(`covers`), fall back to `denoise`.

Results equal `denoise` bitwise on the CPU. On a GPU in half precision they may differ in the last bits:
a coefficient there is a device tensor, rounded to the latents' dtype, where diffusers' CPU scalar is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lbgen.method.sampler import Generators, denoise, guidance_states, stacked_guided_noise

Coefficients = dict[str, torch.Tensor]  # name -> a (T,) table, or one step's 0-dim entry of it


@dataclass(frozen=True)
class SyncFreeSampler:
    """One diffusers scheduler's `step`, rewritten as tables built once plus a pure per-step update.

    covers(config): whether the update below is the scheduler's own for this config.
    tables(scheduler): after `set_timesteps`, the step coefficients as (T,) float32 host tensors, and for
        each step whether its `step` draws noise.
    update(latents, eps, c, noise): the next latents from step i's coefficients `c` (0-dim) and
        pre-drawn noise (None for samplers that draw none), with diffusers' operations in diffusers'
        order, so float rounding matches too.
    model_input(latents, c): what the UNet sees (`scale_model_input`).
    """

    covers: Callable[[dict], bool]
    tables: Callable[[object], tuple[Coefficients, list[bool]]]
    update: Callable[[torch.Tensor, torch.Tensor, Coefficients, torch.Tensor | None], torch.Tensor]
    model_input: Callable[[torch.Tensor, Coefficients], torch.Tensor] = lambda latents, c: latents


def _epsilon_unclipped(config) -> bool:
    """SD 1.5's setting: the UNet predicts noise and x0 is used as predicted (no clipping, no thresholding)."""
    return config.prediction_type == "epsilon" and not config.get("thresholding", False) and not config.get("clip_sample", False)


def _predicted_original(latents: torch.Tensor, eps: torch.Tensor, c: Coefficients) -> torch.Tensor:
    """DDPM's and DDIM's x0 from an epsilon prediction, as their `step` computes it."""
    return (latents - c["sqrt_beta"] * eps) / c["sqrt_alpha"]


def _previous_timesteps(timesteps: list[int]) -> torch.Tensor:
    """DDPM's `previous_timestep` for every step: the next entry after the first occurrence, -1 after the last."""
    nxt = [timesteps[timesteps.index(t) + 1] if timesteps.index(t) + 1 < len(timesteps) else -1 for t in timesteps]
    return torch.tensor(nxt)


def _ddpm_tables(scheduler) -> tuple[Coefficients, list[bool]]:
    timesteps = scheduler.timesteps.cpu().tolist()
    t, prev = torch.tensor(timesteps), _previous_timesteps(timesteps)
    alphas = scheduler.alphas_cumprod.cpu()
    alpha_t = alphas[t]
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.one)
    beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
    current_alpha = alpha_t / alpha_prev
    current_beta = 1 - current_alpha
    variance = torch.clamp((1 - alpha_prev) / (1 - alpha_t) * current_beta, min=1e-20)  # `_get_variance`, fixed_small
    coefficients = {
        "sqrt_beta": beta_t**0.5,
        "sqrt_alpha": alpha_t**0.5,
        "x0": (alpha_prev**0.5 * current_beta) / beta_t,
        "sample": current_alpha**0.5 * beta_prev / beta_t,
        "sigma": variance**0.5,
    }
    return coefficients, [s > 0 for s in timesteps]  # `step` draws only `if t > 0`


def _ddpm_update(latents, eps, c, noise):
    x0 = _predicted_original(latents, eps, c)
    mean = c["x0"] * x0 + c["sample"] * latents
    return mean + c["sigma"] * noise  # the last step's noise is zeros where `step` adds none


def _ddim_tables(scheduler) -> tuple[Coefficients, list[bool]]:
    t = scheduler.timesteps.cpu()
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.cpu()
    alpha_t = alphas[t]
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    coefficients = {
        "sqrt_beta": (1 - alpha_t) ** 0.5,
        "sqrt_alpha": alpha_t**0.5,
        "x0": alpha_prev**0.5,
        "eps": (1 - alpha_prev) ** 0.5,  # `denoise` leaves eta = 0: std_dev_t = 0 and no noise
    }
    return coefficients, [False] * len(t)


def _ddim_update(latents, eps, c, noise):
    x0 = _predicted_original(latents, eps, c)
    return c["x0"] * x0 + c["eps"] * eps


def _sigma_input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """The Euler samplers' `scale_model_input` divisor, sqrt(sigma^2 + 1)."""
    return (sigma**2 + 1) ** 0.5


def _euler_tables(scheduler) -> tuple[Coefficients, list[bool]]:
    sigmas = scheduler.sigmas.cpu()
    sigma = sigmas[:-1]  # with `step`'s default s_churn = 0, gamma = 0 and sigma_hat = sigma
    coefficients = {"sigma": sigma, "dt": sigmas[1:] - sigma, "input_scale": _sigma_input_scale(sigma)}
    return coefficients, [False] * len(sigma)


def _euler_update(latents, eps, c, noise):
    sample = latents.to(torch.float32)
    x0 = sample - c["sigma"] * eps
    derivative = (sample - x0) / c["sigma"]
    return (sample + derivative * c["dt"]).to(eps.dtype)


def _euler_ancestral_tables(scheduler) -> tuple[Coefficients, list[bool]]:
    sigmas = scheduler.sigmas.cpu()
    sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    coefficients = {"sigma": sigma_from, "dt": sigma_down - sigma_from, "sigma_up": sigma_up,
                    "input_scale": _sigma_input_scale(sigma_from)}
    return coefficients, [True] * len(sigma_from)  # every step draws


def _euler_ancestral_update(latents, eps, c, noise):
    sample = latents.to(torch.float32)
    x0 = sample - c["sigma"] * eps
    derivative = (sample - x0) / c["sigma"]
    prev = sample + derivative * c["dt"]
    return (prev + noise * c["sigma_up"]).to(eps.dtype)


def _scaled_input(latents, c):
    return latents / c["input_scale"]


# diffusers scheduler class name -> its sync-free form. PNDM and DPM++ are not here: they fall back to `denoise`.
SYNC_FREE: dict[str, SyncFreeSampler] = {
    "DDPMScheduler": SyncFreeSampler(
        lambda config: _epsilon_unclipped(config) and config.variance_type == "fixed_small",
        _ddpm_tables, _ddpm_update),
    "DDIMScheduler": SyncFreeSampler(_epsilon_unclipped, _ddim_tables, _ddim_update),
    "EulerDiscreteScheduler": SyncFreeSampler(lambda config: config.prediction_type == "epsilon", _euler_tables,
                                              _euler_update, _scaled_input),
    "EulerAncestralDiscreteScheduler": SyncFreeSampler(lambda config: config.prediction_type == "epsilon",
                                                       _euler_ancestral_tables, _euler_ancestral_update, _scaled_input),
}


def sync_free_form(scheduler) -> SyncFreeSampler | None:
    """The SYNC_FREE entry that reproduces `scheduler.step` for its config, or None (use `denoise`)."""
    form = SYNC_FREE.get(type(scheduler).__name__)
    return form if form is not None and form.covers(scheduler.config) else None


def predrawn_noise(draws: list[bool], shape, generator: Generators, device, dtype) -> torch.Tensor | None:
    """(T, *shape) step noise drawn now, step by step, with the call `step` makes (`randn_tensor`, one draw
    per image from its own generator); zeros for a step that draws none, None when no step draws.

    Nothing else draws from the generators between steps, so drawing them all up front leaves each
    generator where the step-by-step loop would, and gives every image the same noise.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if not any(draws):
        return None
    zeros = torch.zeros(shape, device=device, dtype=dtype)
    return torch.stack([randn_tensor(shape, generator=generator, device=device, dtype=dtype) if draw else zeros
                        for draw in draws])


@dataclass
class StepPlan:
    """Every step of one run as device tensors; `run` only indexes them.

    timesteps: (T,) the UNet's timestep per step (the scheduler's own, on the latents' device).
    tables: name -> (T,) float32 step coefficients on the latents' device.
    noise: (T, B, C, h, w) pre-drawn variance noise in the UNet output's dtype, or None for deterministic samplers.
    """

    form: SyncFreeSampler
    timesteps: torch.Tensor
    tables: Coefficients
    noise: torch.Tensor | None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def coefficients(self, i: int) -> Coefficients:
        """Step i's coefficients as 0-dim tensors: views, no copy, no sync."""
        return {name: table[i] for name, table in self.tables.items()}

    def run(self, unet: nn.Module, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *,
            guidance: float, grad_indices: Iterable[int] = ()) -> torch.Tensor:
        """`denoise`'s loop on the plan: only UNet calls at `grad_indices` record a graph, and updates from the
        first of them on stay differentiable (the tables and noise are constants), as in `denoise`."""
        grad_indices = set(grad_indices) if torch.is_grad_enabled() else set()
        first_grad = min(grad_indices, default=self.num_steps)
        states = guidance_states(cond, uncond)  # once per run: every step's UNet call reads the same text states
        for i in range(self.num_steps):
            c = self.coefficients(i)
            with torch.set_grad_enabled(i in grad_indices):
                eps = stacked_guided_noise(unet, self.form.model_input(latents, c), self.timesteps[i], states, guidance)
            with torch.set_grad_enabled(i >= first_grad):
                latents = self.form.update(latents, eps, c, None if self.noise is None else self.noise[i])
        return latents


def _noise_dtype(latents: torch.Tensor) -> torch.dtype:
    """The dtype `step` draws its noise in, the UNet output's: autocast's where it is on (the UNet's last
    convolution runs in it), else the latents' (the UNet's own dtype, as generate casts them)."""
    device_type = latents.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else latents.dtype


def plan_steps(form: SyncFreeSampler, scheduler, latents: torch.Tensor, *, num_steps: int,
               generator: Generators = None) -> tuple[StepPlan, torch.Tensor]:
    """The plan for `num_steps` steps of `scheduler` and the start latents scaled to its first noise level.

    The host work (set_timesteps, tables, noise draws, copies to the device) all happens here.
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    tables, draws = form.tables(scheduler)
    tables = {name: table.to(device=latents.device, dtype=torch.float32) for name, table in tables.items()}
    noise = predrawn_noise(draws, latents.shape, generator, latents.device, _noise_dtype(latents))
    return StepPlan(form, scheduler.timesteps, tables, noise), latents


def denoise_sync_free(
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
    """`sampler.denoise` with the same arguments and results, whose loop makes no host round trip.

    For a scheduler SYNC_FREE does not cover (or a config outside its `covers`), this is `denoise`.
    Gradient steps and autocast work as in `denoise`, so fine-tuning may use it too. The pre-drawn noise
    costs T x the latents' memory.
    """
    form = sync_free_form(scheduler)
    if form is None:
        return denoise(unet, scheduler, latents, cond, uncond, num_steps=num_steps, guidance=guidance,
                       grad_indices=grad_indices, generator=generator)
    plan, latents = plan_steps(form, scheduler, latents, num_steps=num_steps, generator=generator)
    return plan.run(unet, latents, cond, uncond, guidance=guidance, grad_indices=grad_indices)
