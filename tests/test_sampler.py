import pytest
import torch

from lbgen.method.sampler import decode, denoise, gradient_step_indices, initial_latents
from lbgen.method.sync_free import denoise_sync_free, sync_free_form
from lbgen.models import create_generator
from lbgen.models.generator import SCHEDULERS, create_scheduler


@pytest.mark.parametrize("T, K", [(50, 5), (10, 2), (7, 3), (5, 5)])
def test_gradient_steps_follow_the_stride_formula(T, K):
    stride = T // K
    starts = set()
    for seed in range(200):
        idx = gradient_step_indices(T, K, torch.Generator().manual_seed(seed))
        assert len(idx) == K and idx == [idx[0] + j * stride for j in range(K)]
        assert 0 <= idx[0] <= T - stride * (K - 1) - 1 and idx[-1] < T
        starts.add(idx[0])
    assert starts == set(range(T - stride * (K - 1)))  # every legal start occurs


def test_unet_called_T_times_K_with_grad():
    pipe = create_generator("tiny", resolution=64)
    pipe.unet.requires_grad_(False)
    pipe.unet.conv_out.weight.requires_grad_(True)  # something to differentiate
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    latents = initial_latents(2, pipe.unet, pipe.vae_scale_factor, 64, gen, "cpu")
    cond = torch.randn(2, 77, 32)
    T, grad_idx = 8, [2, 5]
    out = denoise(pipe.unet, scheduler, latents, cond, torch.zeros_like(cond), num_steps=T, guidance=2.0, grad_indices=grad_idx, generator=gen)
    assert len(calls) == T and [i for i, g in enumerate(calls) if g] == grad_idx
    decode(pipe.vae, out).mean().backward()
    assert pipe.unet.conv_out.weight.grad.abs().sum() > 0


def test_no_grad_when_the_caller_disables_it():
    pipe = create_generator("tiny", resolution=64)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(1, 4, 32, 32)
    cond = torch.randn(1, 77, 32)
    with torch.no_grad():
        out = denoise(pipe.unet, scheduler, latents, cond, cond, num_steps=3, guidance=1.0, grad_indices=[1])
    assert not out.requires_grad


def test_per_image_generators_make_images_batch_independent():
    pipe = create_generator("tiny", resolution=64)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = initial_latents(2, pipe.unet, pipe.vae_scale_factor, 64, gens([1, 2]), "cpu")
    alone = initial_latents(1, pipe.unet, pipe.vae_scale_factor, 64, gens([2]), "cpu")
    assert torch.equal(both[1:], alone)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("generator", ["tiny", "mini"])  # mini's config file sets `leading` steps: Euler starts below its top sigma
def test_denoise_equals_diffusers_own_pipeline_loop_for_every_sampler(generator, name):
    """`denoise` against `StableDiffusionPipeline.__call__` with the same sampler, start noise, prompt states and
    step generator: the same latents. A sampler whose first noise level, step arguments or CFG differ from
    diffusers' (Euler's sigma before its timesteps are set, a generator PNDM's step refuses) fails here."""
    pipe = create_generator(generator, resolution=32)
    pipe.scheduler = create_scheduler(name, pipe.scheduler.config)
    draw = torch.Generator().manual_seed(0)
    noise = initial_latents(2, pipe.unet, pipe.vae_scale_factor, 32, draw, "cpu")
    width = pipe.text_encoder.config.hidden_size
    cond, uncond = torch.randn(2, 77, width, generator=draw), torch.randn(2, 77, width, generator=draw)
    with torch.no_grad():
        ours = denoise(pipe.unet, create_scheduler(name, pipe.scheduler.config), noise, cond, uncond, num_steps=5,
                       guidance=2.0, generator=torch.Generator().manual_seed(1))
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=5, guidance_scale=2.0,
                      height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------- the sync-free loop (issue 26)

SYNC_FREE_SAMPLERS = ["ddpm", "ddim", "euler", "euler-a"]  # generate's default (ddpm) first


@pytest.fixture(scope="module")
def tiny():
    """The tiny generator at 32 px (16 x 16 latents), built once: the tests below only read it."""
    return create_generator("tiny", resolution=32)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _prompt_states(pipe, batch: int, seed: int = 0):
    draw = torch.Generator().manual_seed(seed)
    width = pipe.text_encoder.config.hidden_size
    return torch.randn(batch, 77, width, generator=draw), torch.randn(batch, 77, width, generator=draw)


def _run(denoiser, pipe, scheduler, seeds, cond, uncond, *, steps, device="cpu", one_generator=False, **kwargs):
    """`denoiser` from `initial_latents` with one generator per image (generate's use), or with one for the
    batch seeded with seeds[0] (fine-tuning's), drawn from for the start noise and then passed on to the
    loop; returns the latents and the generator(s)."""
    generators = [torch.Generator(device).manual_seed(s) for s in seeds[:1 if one_generator else None]]
    generators = generators[0] if one_generator else generators
    latents = initial_latents(len(seeds), pipe.unet, pipe.vae_scale_factor, 32, generators, device)
    out = denoiser(pipe.unet, scheduler, latents, cond, uncond, num_steps=steps, guidance=2.0, generator=generators, **kwargs)
    return out, generators


def _scheduler(pipe, name, **overrides):
    """A fresh sampler `name` from the pipeline's scheduler config with `overrides`. The config's
    `_use_default_values` is dropped: diffusers would reset the keys it lists to the new class's defaults,
    overrides included."""
    config = {key: value for key, value in pipe.scheduler.config.items() if key != "_use_default_values"}
    scheduler = create_scheduler(name, {**config, **overrides})
    assert all(scheduler.config[key] == value for key, value in overrides.items())
    return scheduler


@pytest.mark.parametrize("steps, spacing", [(1, None), (4, None), (10, None), (4, "linspace"), (4, "leading"), (4, "trailing")])
@pytest.mark.parametrize("name", SYNC_FREE_SAMPLERS)
def test_sync_free_loop_equals_denoise(tiny, name, steps, spacing):
    """Against `denoise` (diffusers' own `scheduler.step` each step) on 3 images with their own generators:
    bitwise the same latents, and every generator left in the same state (the pre-drawn noise is the
    noise `step` draws, no more, no less). `linspace` ends on t = 0, where DDPM's step draws nothing."""
    overrides = {"timestep_spacing": spacing} if spacing else {}
    scheduler = _scheduler(tiny, name, **overrides)
    assert sync_free_form(scheduler) is not None  # else the comparison is `denoise` against itself
    cond, uncond = _prompt_states(tiny, 3)
    with torch.no_grad():
        ours, our_gens = _run(denoise_sync_free, tiny, scheduler, [5, 6, 7], cond, uncond, steps=steps)
        theirs, their_gens = _run(denoise, tiny, _scheduler(tiny, name, **overrides), [5, 6, 7], cond, uncond, steps=steps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for our, their in zip(our_gens, their_gens):
        assert torch.equal(our.get_state(), their.get_state())


def test_sync_free_ddpm_image_does_not_depend_on_its_batch(tiny):
    """An image's seed and prompt fix its latents whatever the other images of its (same-size) batch are:
    each image's step noise comes from its own generator only."""
    cond, uncond = _prompt_states(tiny, 3)
    other_cond, other_uncond = _prompt_states(tiny, 3, seed=1)
    other_cond[1], other_uncond[1] = cond[1], uncond[1]
    with torch.no_grad():
        batch, _ = _run(denoise_sync_free, tiny, _scheduler(tiny, "ddpm"), [10, 11, 12], cond, uncond, steps=4)
        other, _ = _run(denoise_sync_free, tiny, _scheduler(tiny, "ddpm"), [20, 11, 22], other_cond, other_uncond, steps=4)
    assert not torch.equal(batch[0], other[0])
    torch.testing.assert_close(batch[1], other[1], rtol=0, atol=0)


def test_sync_free_gradient_steps_equal_denoise(tiny):
    """Fine-tuning's use, one generator for the batch and gradient steps at 1 and 3 of 5: the same latents and
    the same gradient on a UNet weight as `denoise` (tables and noise are constants; the updates stay
    differentiable), and the generator where `denoise` leaves it for the draws that follow."""
    weight = tiny.unet.conv_out.weight
    cond, uncond = _prompt_states(tiny, 2)
    results = []
    for denoiser in (denoise_sync_free, denoise):
        out, generator = _run(denoiser, tiny, _scheduler(tiny, "ddpm"), [3, 4], cond, uncond, steps=5, one_generator=True,
                              grad_indices=[1, 3])
        results.append((out.detach(), torch.autograd.grad(out.square().mean(), weight)[0], generator.get_state()))
    (ours, our_grad, our_state), (theirs, their_grad, their_state) = results
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert our_grad.abs().sum() > 0
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=0)
    assert torch.equal(our_state, their_state)


def test_sync_free_loop_stacks_the_text_states_once(tiny):
    """The guidance's [uncond, cond] text states are stacked once per run, not per step: every UNet call reads
    the same tensor."""
    seen = []
    hook = tiny.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]),
                                               with_kwargs=True)
    cond, uncond = _prompt_states(tiny, 2)
    try:
        with torch.no_grad():
            _run(denoise_sync_free, tiny, _scheduler(tiny, "ddpm"), [1, 2], cond, uncond, steps=3)
    finally:
        hook.remove()
    assert len(seen) == 3 and all(states is seen[0] for states in seen)
    torch.testing.assert_close(seen[0], torch.cat([uncond, cond]), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ddpm", "euler-a"])
def test_sync_free_loop_under_autocast_equals_denoise(tiny, name):
    """Under autocast (fine-tuning's mixed precision) the UNet returns bfloat16 and `step` draws its noise in
    bfloat16 from float32 latents: the pre-drawn noise must be too, for the same latents."""
    cond, uncond = _prompt_states(tiny, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = _run(denoise_sync_free, tiny, _scheduler(tiny, name), [8, 9], cond, uncond, steps=4, one_generator=True)
        theirs, _ = _run(denoise, tiny, _scheduler(tiny, name), [8, 9], cond, uncond, steps=4, one_generator=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


class HostSync(Exception):
    """A tensor's value was read on the host inside the denoising loop."""


# Every way Python code reads a tensor's value on the host (on a GPU: a device->host copy and a sync).
HOST_READS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def _run_with_host_reads_trapped(denoiser, pipe, name, monkeypatch):
    """`denoiser`, 4 steps on 3 images, with every HOST_READS raising HostSync from the first UNet call on:
    the setup (timesteps, tables, noise) may read on the host, the loop may not."""

    def trap(attr):
        def read(*args, **kwargs):
            raise HostSync(f"Tensor.{attr} in the loop")

        return read

    def arm(module, args):
        if not armed:
            armed.append(True)
            for attr in HOST_READS:
                monkeypatch.setattr(torch.Tensor, attr, trap(attr))

    armed = []
    hook = pipe.unet.register_forward_pre_hook(arm)
    cond, uncond = _prompt_states(pipe, 3)
    try:
        with torch.no_grad():
            _run(denoiser, pipe, _scheduler(pipe, name), [1, 2, 3], cond, uncond, steps=4)
    finally:
        monkeypatch.undo()
        hook.remove()


@pytest.mark.parametrize("name", SYNC_FREE_SAMPLERS)
def test_sync_free_loop_reads_no_tensor_on_the_host(tiny, name, monkeypatch):
    """No `.item()`, `.cpu()`, `nonzero`, truth test or int/float conversion of a tensor in the loop, the UNet
    included, for each covered sampler."""
    _run_with_host_reads_trapped(denoise_sync_free, tiny, name, monkeypatch)


def test_the_host_read_trap_catches_denoise(tiny, monkeypatch):
    """The trap above works: it catches DDPM's `scheduler.step` (`nonzero` on the timesteps, `if t > 0`).
    (It catches DDIM's and Euler's too; Euler-ancestral's step reads no tensor after its first: it keeps its
    step index in Python and its sigmas on the CPU, which needs no sync but changes each step's arguments.)"""
    with pytest.raises(HostSync):
        _run_with_host_reads_trapped(denoise, tiny, "ddpm", monkeypatch)


def _run_with_cuda_syncs_raising(denoiser, pipe, name):
    """`denoiser` on the GPU, 4 steps on 3 images with CUDA generators as generate uses, torch's sync debug mode
    raising on any synchronising call from the first UNet call on."""
    cond, uncond = (states.cuda() for states in _prompt_states(pipe, 3))
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: torch.cuda.set_sync_debug_mode("error"))
    try:
        with torch.no_grad():
            _run(denoiser, pipe, _scheduler(pipe, name), [1, 2, 3], cond, uncond, steps=4, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        hook.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sync_free_loop_makes_no_cuda_sync():
    """On a GPU no covered sampler's loop synchronises; DDPM's `denoise` does (the trap works)."""
    pipe = create_generator("tiny", resolution=32, device="cuda")
    for name in SYNC_FREE_SAMPLERS:
        _run_with_cuda_syncs_raising(denoise_sync_free, pipe, name)
    with pytest.raises(RuntimeError, match="synchroniz"):
        _run_with_cuda_syncs_raising(denoise, pipe, "ddpm")


@pytest.mark.parametrize("name, overrides", [("pndm", {}), ("dpm++", {}), ("ddpm", {"clip_sample": True}),
                                             ("ddim", {"prediction_type": "v_prediction"})])
def test_samplers_sync_free_does_not_cover_fall_back_to_denoise(tiny, name, overrides):
    """A sampler outside SYNC_FREE (multistep state) or a config outside its form (clipping, v-prediction)
    runs `denoise` itself: the same latents, never the wrong update."""
    assert sync_free_form(_scheduler(tiny, name, **overrides)) is None
    cond, uncond = _prompt_states(tiny, 2)
    with torch.no_grad():
        ours, _ = _run(denoise_sync_free, tiny, _scheduler(tiny, name, **overrides), [1, 2], cond, uncond, steps=3)
        theirs, _ = _run(denoise, tiny, _scheduler(tiny, name, **overrides), [1, 2], cond, uncond, steps=3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
