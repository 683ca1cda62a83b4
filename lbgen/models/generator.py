"""`create_generator`: a diffusers Stable Diffusion pipeline from a name.

Names: a registered builder (`tiny`: small seeded random modules built in code, no download; `mini`: the
small SD trained on real Fashion-MNIST that ships in the package;
`sd15-shape`: SD 1.5's architecture, random weights; `sleep:<ms>`: a GPU-like stand-in for scale
tests and benchmarks only), a local directory saved with `save_pretrained`, or a hub id.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from lbgen.errors import ConfigError
from lbgen.models.hub import hub_access, is_local_path, not_found

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# SD 1.5's own scheduler config (its `scheduler/scheduler_config.json`, a PNDMScheduler); training uses DDPM with its
# noise schedule (DESIGN 1.1). Every sampler is built from it with `from_config`, which carries keys a class does
# not take: without `skip_prk_steps`, PNDM would add 9 Runge-Kutta UNet calls (and fail below 4 steps); without
# `set_alpha_to_one=False` and `clip_sample=False`, DDIM's last step and its clipping would differ from SD 1.5's.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


def _quiet_diffusers():
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def clip_bpe_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer with the real CLIP BPE vocabulary that open_clip ships (offline).

    transformers 5 ignores `CLIPTokenizer(vocab_file=..., merges_file=...)` and yields a
    2-token tokenizer, so the files are written out and loaded with `from_pretrained`.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    # open_clip names the special tokens differently; CLIP's names keep ids 49406/49407.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for (a, b), _ in merges]
        (Path(tmp) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            tmp, model_max_length=model_max_length, pad_token="<|endoftext|>"
        )


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    """A `StableDiffusionPipeline` of these modules with SD 1.5's scheduler, no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny(resolution: int = 64, seed: int = 0):
    """Small seeded random SD pipeline: UNet (32, 64), VAE (32, 64), 2-layer text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // 2,  # the tiny VAE downsamples by 2
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=resolution,
        )
        tokenizer = clip_bpe_tokenizer()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return assemble_pipeline(unet, vae, text_encoder, tokenizer)


def build_sd15_shape(resolution: int = 512, seed: int = 0):
    """Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder from their configs, random weights.

    The real workload's parameter counts and activations (UNet ~860 M, VAE ~84 M, text encoder
    ~123 M parameters), so speed and memory figures match SD 1.5 although no weights are downloaded.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(  # SD 1.5 unet/config.json
            sample_size=resolution // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(  # SD 1.5 vae/config.json
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=resolution,
        )
        tokenizer = clip_bpe_tokenizer()
        text_encoder = CLIPTextModel(  # SD 1.5 text_encoder/config.json (CLIP ViT-L/14 text tower)
            CLIPTextConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
                hidden_act="quick_gelu",
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return assemble_pipeline(unet, vae, text_encoder, tokenizer)


# The `sleep:` stand-in's test hooks (see SleepUNet).
SLEEP_SLOWDOWN_ENV, SLEEP_CALLS_ENV = "LBGEN_SLEEP_SLOWDOWN", "LBGEN_SLEEP_CALLS"


def sleep_unet_class():
    """`SleepUNet`, defined on first use: diffusers is imported lazily."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    class SleepUNet(ModelMixin, ConfigMixin):
        """TEST AND BENCHMARK ONLY: a UNet stand-in that looks like a GPU from the host's side.

        Each call waits `delay_ms` without using a CPU (as a host thread waits on a GPU kernel), then
        returns a deterministic function of its input, so everything around it runs for real.
        $SLEEP_SLOWDOWN_ENV on a simulated node multiplies its wait (a slower GPU: a straggler), and
        $SLEEP_CALLS_ENV names a directory where each call leaves a file (the calls a run made, re-made
        work included).
        """

        @register_to_config
        def __init__(self, sample_size: int, delay_ms: float, in_channels: int = 4, out_channels: int = 4):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))  # gives the module a dtype and a device
            self.slowdown = float(os.environ.get(SLEEP_SLOWDOWN_ENV, "1"))

        def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
            time.sleep(self.config.delay_ms * self.slowdown / 1000)
            if calls := os.environ.get(SLEEP_CALLS_ENV):
                Path(calls, f"{os.getpid()}-{time.monotonic_ns()}").touch()
            return UNet2DConditionOutput(sample=sample * self.scale)

    return SleepUNet


def sleep_delay(argument: str) -> float:
    """The milliseconds of `sleep:<ms>`; anything else is a ConfigError naming it."""
    try:
        delay = float(argument)
    except ValueError:
        delay = -1.0
    if not delay >= 0:
        raise ConfigError(f"model.generator 'sleep:{argument}': the delay must be milliseconds >= 0 (e.g. sleep:250)")
    return delay


def build_sleep(delay_ms: float, resolution: int = 512, seed: int = 0):
    """`sleep:<ms>`, TEST AND BENCHMARK ONLY: the tiny text encoder, a UNet call that waits `delay_ms`
    per micro-batch and uses no CPU, and a one-block VAE (no downsampling) whose decode is cheap."""
    from diffusers import AutoencoderKL

    tiny = build_tiny(resolution=64, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Narrow, one block, no attention: a real decode whose CPU cost stays small beside the "GPU" time.
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=resolution,
                            mid_block_add_attention=False)
    unet = sleep_unet_class()(sample_size=resolution, delay_ms=delay_ms)
    return assemble_pipeline(unet, vae, tiny.text_encoder, tiny.tokenizer)


def build_mini(resolution: int = 32, seed: int = 0):
    """The generator trained on real Fashion-MNIST that ships in the package (`scripts/train_mini.py`):
    SD's layout at 32 px (8 x 8 x 4 latents). Its weights are trained: resolution and seed are unused."""
    from diffusers import StableDiffusionPipeline

    from lbgen.models.shipped import shipped_dir

    return StableDiffusionPipeline.from_pretrained(shipped_dir("mini", "generator"), safety_checker=None, requires_safety_checker=False)


# The file diffusers writes and `pipe.load_lora_weights(dir)` reads: finetune's output, generate's input.
LORA_FILE = "pytorch_lora_weights.safetensors"

GENERATOR_BUILDERS: dict[str, Callable[..., object]] = {"tiny": build_tiny, "sd15-shape": build_sd15_shape, "mini": build_mini}
# Builders whose weights ship in the package: `check_generator` looks for their files.
SHIPPED_GENERATORS = frozenset({"mini"})
# Builders that take an argument in their name, `NAME:ARG` (`sleep:250`).
PARAMETRIC_BUILDERS: dict[str, tuple[Callable[[str], object], Callable[..., object]]] = {"sleep": (sleep_delay, build_sleep)}


def simulates_gpu(name: str) -> bool:
    """Whether generator `name` is the `sleep:<ms>` stand-in: scheduled on GPUs, computing on the CPU."""
    return name.partition(":")[0] == "sleep" and ":" in name


def builder_for(name: str) -> Callable[..., object] | None:
    """The builder `name` refers to (`tiny`, `sleep:250`, ...), or None for a path or hub id; a bad
    builder argument is a ConfigError."""
    if name in GENERATOR_BUILDERS:
        return GENERATOR_BUILDERS[name]
    prefix, colon, argument = name.partition(":")
    if not (colon and prefix in PARAMETRIC_BUILDERS):
        return None
    parse, build = PARAMETRIC_BUILDERS[prefix]
    return partial(build, parse(argument))

# Sampler name -> diffusers scheduler class name; all are built from the model's own scheduler config.
SCHEDULERS: dict[str, str] = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def create_scheduler(name: str, config):
    """A fresh diffusers scheduler `name` (a key of SCHEDULERS) from a pipeline's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)

HOW_TO_PROVIDE = (
    "Pass a local directory written by `StableDiffusionPipeline.save_pretrained`, or download the "
    "model on a machine with network (`huggingface-cli download ID`) into $HF_HOME, or use --generator tiny."
)


def check_generator(name_or_path: str) -> None:
    """Fail fast, without loading weights, if `create_generator(name_or_path)` cannot find the model.

    For drivers that load the model elsewhere (Ray actors), where a failure would surface late
    and wrapped. A hub id passes when the hub answers (the load downloads) or when it is cached.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name_or_path in SHIPPED_GENERATORS:
        from lbgen.models.shipped import shipped_dir

        shipped_dir(name_or_path, "generator")
        return
    if builder_for(name_or_path) is not None:
        return
    if is_local_path(name_or_path):
        if not os.path.isfile(os.path.join(os.path.expanduser(name_or_path), "model_index.json")):
            raise not_found("generator", name_or_path, f"A local generator must be a directory holding model_index.json. {HOW_TO_PROVIDE}")
        return
    try:
        validate_repo_id(name_or_path)
    except HFValidationError as err:
        raise not_found("generator", name_or_path, HOW_TO_PROVIDE, err) from None
    with hub_access() as online:
        if not online and not isinstance(try_to_load_from_cache(name_or_path, "model_index.json"), str):
            raise not_found("generator", name_or_path, HOW_TO_PROVIDE)


def create_generator(
    name_or_path: str,
    *,
    resolution: int = 512,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """A `StableDiffusionPipeline` from a builder name, a local directory or a hub id.

    Args:
        name_or_path: a builder (`tiny`, `sd15-shape`, `sleep:<ms>`), a directory, or a hub id.
        resolution: image side for built-in builders (hub/local models keep their own).
        torch_dtype: weight dtype of the loaded modules.
        device: where the pipeline is placed.
        seed: initialisation seed for built-in builders.
    Raises:
        ModelNotFoundError: the model is neither local, cached, nor reachable (fast, no hang).
    """
    from diffusers import StableDiffusionPipeline

    _quiet_diffusers()
    if (builder := builder_for(name_or_path)) is not None:
        pipe = builder(resolution=resolution, seed=seed)
    elif is_local_path(name_or_path):
        path = os.path.expanduser(name_or_path)
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise not_found("generator", name_or_path, f"A local generator must be a directory holding model_index.json. {HOW_TO_PROVIDE}")
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    else:
        with hub_access() as online:
            try:
                pipe = StableDiffusionPipeline.from_pretrained(
                    name_or_path, safety_checker=None, requires_safety_checker=False, local_files_only=not online
                )
            except (OSError, ValueError) as err:
                raise not_found("generator", name_or_path, HOW_TO_PROVIDE, err) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=torch_dtype)
