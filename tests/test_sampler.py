import pytest
import torch

from lbgen.method.sampler import decode, denoise, gradient_step_indices, initial_latents
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
