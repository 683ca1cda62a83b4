"""`generate.fast`, the known fast paths of generation (issue 26; `FastPath` in lbgen.stages.generate), against
`--no-fast` (`EagerPath`): the same pixels within 2/255 or at 40 dB on SD 1.5's architecture and on the tiny
generator with a LoRA (all paths, and each path of `generate.fast_paths` alone, taking only itself), an image
independent of its batch, the text states bitwise the eager ones, the fast
settings part of the dataset's content, slow attention refused, and one compilation per actor.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time

import numpy as np
import pytest
import torch
from configs import tiny
from test_generate import make_lora

from lbgen.config import Config, resolve
from lbgen.config.choices import FAST_PATHS
from lbgen.data.classes import load_class_table
from lbgen.data.plan import plan
from lbgen.data.writer import DatasetWriter
from lbgen.errors import DatasetError
from lbgen.method.sampler import encode_prompts
from lbgen.method.sync_free import denoise_sync_free
from lbgen.stages.generate import RESUMABLE_FIELDS, GenerateBatch, SlowAttentionError, content_settings, dataset_plan

FAST_SETTINGS = {"fast", "fast_paths", "compile", "compile_vae"}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16, cuDNN, CUDA graphs)")


def with_generate(cfg: Config, **settings) -> Config:
    return dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, **settings))


def planned(cfg: Config, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows start..stop of `cfg`'s plan as a batch."""
    rows = plan(load_class_table(cfg.classes), cfg)[start:stop]
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def made(cfg: Config, batch: dict, device: str = "cpu", **settings) -> np.ndarray:
    """The pixels a fresh actor of `cfg` with generate `settings` makes of `batch`; its model is freed before
    the caller builds the next (two SD 1.5-sized models at once would double the memory)."""
    start = time.perf_counter()
    generate = GenerateBatch(dataclasses.asdict(with_generate(cfg, **settings)), device)
    pixels = generate(batch)["pixels"]
    print(f"{settings or 'fast'}: {time.perf_counter() - start:.1f} s, model built")
    del generate
    gc.collect()
    return pixels


def closeness(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """The largest pixel difference (of 255) and the PSNR in dB (inf when equal)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff**2))
    return int(np.abs(diff).max()), (float("inf") if mse == 0 else 10 * np.log10(255**2 / mse))


def assert_equal_pixels(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    """Two paths' images of one batch: a difference of at most 2/255 everywhere, or a PSNR of 40 dB."""
    assert ours.shape == reference.shape and reference.std() > 1 and not np.array_equal(reference[0], reference[1])
    largest, psnr = closeness(ours, reference)
    print(f"{what}: max abs difference {largest}/255, PSNR {psnr:.1f} dB")
    assert largest <= 2 or psnr >= 40, f"{what}: max abs difference {largest}/255, PSNR {psnr:.1f} dB"


# ---------------------------------------------------------------- equal pixels


# SD 1.5's UNet, VAE and text encoder (random weights) at 128 px: 4 DDPM steps on a micro-batch of 2, in fp32
# (a CPU's fp16 and bf16 are emulated or far slower).
SD15_SHAPE = {"model": {"resolution": 128}, "generate": {"fast": True, "steps": 4, "micro_batch": 2, "batch_size": 2, "dtype": "fp32",
                                                         "threads": 2, "images_per_class": 1}}


# The paths that change the arithmetic on a CPU, each alone: the others do nothing here (no LoRA to unload, cuDNN
# only on a GPU), only check (require_sdpa), or are bitwise the eager path (prompt_cache: its own test), as each
# alone on the tiny generator shows (test_each_fast_path_alone_equals_eager_and_takes_only_itself); all 7 took 3 min.
ARITHMETIC_PATHS = ["sync_free", "fused_qkv", "channels_last"]


@pytest.mark.slow
class TestSD15Architecture:
    """All the fast paths, and each that changes the arithmetic alone, against `--no-fast` on SD 1.5's UNet, VAE
    and text encoder (random weights) at 128 px."""

    @pytest.fixture(scope="class")
    def sd15(self):
        """(the eager path's pixels of two planned rows, `made` for those rows): SD 1.5's random 1.1 B weights are
        drawn once for the class and freed after it; each actor builds on a copy of them, since a fast path changes
        the modules in place."""
        import lbgen.models.generator as generators

        cfg = resolve("sd15-shape", overrides=SD15_SHAPE)
        base = generators.create_generator(cfg.model.generator, resolution=cfg.model.resolution, seed=cfg.seed)
        batch = planned(cfg, 0, 2)

        def make(**settings) -> np.ndarray:
            with pytest.MonkeyPatch.context() as patch:  # only while this actor builds: other tests get their own models
                patch.setattr(generators, "create_generator", lambda *args, **kwargs: copy.deepcopy(base))
                return made(cfg, batch, **settings)

        yield make(fast=False), make
        del base
        gc.collect()

    @pytest.mark.parametrize("paths", [list(FAST_PATHS), *([path] for path in ARITHMETIC_PATHS)], ids=["all", *ARITHMETIC_PATHS])
    def test_fast_equals_eager(self, sd15, paths):
        eager, make = sd15
        assert eager.shape == (2, 128, 128, 3)
        assert_equal_pixels(make(fast_paths=paths), eager, f"sd15-shape, 128 px, 4 steps, fast paths {'+'.join(paths)} against eager")


def test_fast_equals_eager_with_a_lora(tmp_path):
    """The LoRA merged, then its adapter layers removed: the UNet holds plain modules, and the merged weights
    stay (the images are the eager path's, not the base model's)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = tiny(generate={"fast": True, "lora": str(make_lora(tmp_path))})
    batch = planned(cfg, 0, 4)
    generate = GenerateBatch(dataclasses.asdict(cfg))
    assert not any(isinstance(module, BaseTunerLayer) for module in generate.pipe.unet.modules())
    fast = generate(batch)["pixels"]
    assert_equal_pixels(fast, made(cfg, batch, fast=False), "tiny + LoRA, fast against eager")
    largest, psnr = closeness(fast, made(cfg, batch, lora=None))
    print(f"tiny: with the LoRA against without: max abs difference {largest}/255, PSNR {psnr:.1f} dB")
    assert largest > 2 and psnr < 40  # the LoRA shows: the comparison above could tell a lost LoRA


def _lora_unloaded(generate) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return not any(isinstance(module, BaseTunerLayer) for module in generate.pipe.unet.modules())


# What each fast path visibly does to an actor after one batch; require_sdpa shows only by refusing slow attention
# (test_slow_attention_is_refused_naming_its_processors) and cudnn_benchmark only on a GPU.
TAKEN = {
    "sync_free": lambda generate: generate.path.denoise is denoise_sync_free,
    "unload_lora": _lora_unloaded,
    "fused_qkv": lambda generate: {type(p).__name__ for p in generate.pipe.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"},
    "channels_last": lambda generate: generate.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
                                      and generate.path.memory_format == torch.channels_last,
    "prompt_cache": lambda generate: bool(generate.path.states),
}


@pytest.mark.parametrize("path", list(FAST_PATHS))
def test_each_fast_path_alone_equals_eager_and_takes_only_itself(path, tmp_path):
    """`generate.fast_paths` naming one path: the eager path's pixels (the tiny generator with a LoRA, so that
    unload_lora has adapter layers to remove), that path taken and no other."""
    cfg = tiny(generate={"fast": True, "fast_paths": [path], "lora": str(make_lora(tmp_path))})
    batch = planned(cfg, 0, 4)
    generate = GenerateBatch(dataclasses.asdict(cfg))
    fast = generate(batch)["pixels"]
    assert {name for name, taken in TAKEN.items() if taken(generate)} == ({path} & set(TAKEN))
    assert_equal_pixels(fast, made(cfg, batch, fast=False), f"tiny + LoRA, fast path {path} alone against eager")


@needs_cuda
def test_fast_equals_eager_on_a_gpu_in_half_precision():
    """fp16 on CUDA, where the fast paths pay (cuDNN's autotuner, channels_last, fused projections): 512 px."""
    cfg = resolve("sd15-shape", overrides={"generate": {"fast": True, "steps": 20, "micro_batch": 2, "batch_size": 2, "dtype": "fp16"}})
    batch = planned(cfg, 0, 2)
    eager = made(cfg, batch, "cuda", fast=False)
    assert_equal_pixels(made(cfg, batch, "cuda"), eager, "sd15-shape, 512 px, 20 steps, fp16 on CUDA, fast against eager")
    assert torch.backends.cudnn.benchmark


# ---------------------------------------------------------------- an image is the same wherever it is made


@pytest.mark.slow
def test_fast_pixels_do_not_depend_on_batching():
    """Batches larger than, not a multiple of, and smaller than the micro-batch give the same pixels, each made by
    a fresh actor, so each arrangement fills the prompt cache from micro-batches of its own."""
    cfg = tiny(generate={"fast": True, "images_per_class": 3})
    assert cfg.generate.fast and cfg.generate.micro_batch == 4

    def pixels(bounds: list[tuple[int, int]]) -> np.ndarray:
        generate = GenerateBatch(dataclasses.asdict(cfg))
        return np.concatenate([generate(planned(cfg, start, stop))["pixels"] for start, stop in bounds])

    whole = pixels([(0, 12)])  # three model calls of 4
    assert whole.shape == (12, 64, 64, 3) and not np.array_equal(whole[0], whole[1])
    np.testing.assert_array_equal(whole, pixels([(0, 5), (5, 10), (10, 12)]))
    np.testing.assert_array_equal(whole, pixels([(i, i + 1) for i in range(11, -1, -1)])[::-1])  # alone, last first


def test_cached_prompt_states_equal_the_in_batch_encoding():
    """Each prompt encoded once per actor, in a batch of `micro_batch` rows as `--no-fast` encodes every micro-batch
    (on this host's CPU the text encoder's rows do not depend on the row count, but kernels may choose their code
    path by shape), and every micro-batch's states bitwise what `--no-fast` encodes for it: each prompt at any
    row, beside any others, encoded first in another micro-batch or in this one."""
    cfg = tiny(generate={"fast": True})
    assert cfg.generate.micro_batch == 4
    generate = GenerateBatch(dataclasses.asdict(cfg))
    names = load_class_table(cfg.classes).names
    prompts = [cfg.generate.prompt_template.format(name=name) for name in names[:6]]
    rows_encoded = []
    generate.pipe.text_encoder.register_forward_pre_hook(lambda module, args: rows_encoded.append(len(args[0])))
    for rows in ([0, 1, 2, 3], [3, 0, 5, 5], [4, 4, 4, 4], [2, 1, 4, 3], [4, 0, 1, 0]):
        batch = [prompts[i] for i in rows]
        cached = generate.path.prompt_states(batch)
        torch.testing.assert_close(cached, encode_prompts(generate.pipe, batch, generate.device), rtol=0, atol=0)
    assert set(rows_encoded) == {4}
    assert list(generate.path.states) == prompts[:4] + [prompts[5], prompts[4]]  # each once, when first asked for


# ---------------------------------------------------------------- what the dataset is


def test_fast_settings_define_the_dataset(tmp_path):
    """`fast`, the paths taken, `compile` and `compile_vae` are content settings: a dataset made fast is never resumed
    eager or with other paths; `fast_paths` counts only when fast is on, and in no particular order."""
    cfg = tiny(generate={"fast": True, "output": str(tmp_path / "ds")})
    table = load_class_table(cfg.classes)
    content = content_settings(cfg, table, None)["generate"]
    assert {key: content[key] for key in FAST_SETTINGS} == {"fast": True, "fast_paths": list(FAST_PATHS), "compile": "none",
                                                            "compile_vae": False}
    assert not FAST_SETTINGS & RESUMABLE_FIELDS

    def opens(other: Config) -> None:
        with DatasetWriter.open(other.generate.output, dataset_plan(other, table, None), config={}, run={}):
            pass

    opens(cfg)
    opens(with_generate(cfg, fast_paths=list(reversed(FAST_PATHS))))
    for other, change in [(with_generate(cfg, fast=False), "fast: True -> False"),
                          (with_generate(cfg, fast_paths=["sync_free"]), "fast_paths: .* -> \\['sync_free'\\]"),
                          (with_generate(cfg, compile="default"), "compile: 'none' -> 'default'")]:
        with pytest.raises(DatasetError, match=f"other settings.*generate.{change}"):
            opens(other)
    eager = tiny(generate={"fast": False, "output": str(tmp_path / "eager")})
    opens(eager)
    opens(with_generate(eager, fast_paths=["sync_free"]))  # no path is taken with fast off


def test_fast_settings_are_checked():
    from lbgen.config import ConfigError

    for settings, message in [({"compile": "fastest"}, "generate.compile must be one of none, default"),
                              ({"compile": "default", "fast": False}, "generate.fast must be on to compile"),
                              ({"compile_vae": True}, "generate.compile_vae needs a generate.compile mode"),
                              ({"fast_paths": ["sync_free", "warp"]}, "generate.fast_paths must name fast paths among "
                                                                      "sync_free, .*, got warp")]:
        with pytest.raises(ConfigError, match=message):
            tiny(generate={"fast": True, **settings})


# ---------------------------------------------------------------- attention


def test_fast_attention_is_fused_sdpa_in_channels_last():
    generate = GenerateBatch(dataclasses.asdict(tiny(generate={"fast": True})))
    for model in (generate.pipe.unet, generate.pipe.vae):
        assert {type(p).__name__ for p in model.attn_processors.values()} == {"FusedAttnProcessor2_0"}
        kernels = [p for p in model.parameters() if p.dim() == 4]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)


def test_slow_attention_is_refused_naming_its_processors(monkeypatch):
    """A UNet whose attention runs the classic processor: the fast path refuses to build, naming it; --no-fast runs it."""
    from diffusers.models.attention_processor import AttnProcessor

    import lbgen.models.generator as generators

    build = generators.create_generator

    def classic(*args, **kwargs):
        pipe = build(*args, **kwargs)
        pipe.unet.set_attn_processor(AttnProcessor())
        return pipe

    monkeypatch.setattr(generators, "create_generator", classic)
    cfg = tiny(generate={"fast": True})
    with pytest.raises(SlowAttentionError, match=r"the UNet's attention runs AttnProcessor \(\d+ layers\), not SDPA"):
        GenerateBatch(dataclasses.asdict(cfg))
    eager = GenerateBatch(dataclasses.asdict(with_generate(cfg, fast=False)))
    assert {type(p).__name__ for p in eager.pipe.unet.attn_processors.values()} == {"AttnProcessor"}


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_generation_compiles_once_per_actor():
    """Inductor on the CPU, UNet and VAE decoder: the first batch compiles; the second, a single row padded to the
    micro-batch, compiles nothing new (no new frame, no new graph); the pixels are the uncompiled fast path's."""
    from torch._dynamo.utils import counters

    cfg = tiny(generate={"fast": True, "compile": "default", "compile_vae": True, "steps": 2, "micro_batch": 2})
    generate = GenerateBatch(dataclasses.asdict(cfg))
    start = time.perf_counter()
    first = generate(planned(cfg, 0, 2))["pixels"]
    print(f"first batch, compiling: {time.perf_counter() - start:.1f} s")
    compiled = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    assert compiled[1] > 0
    second = generate(planned(cfg, 2, 3))["pixels"]
    assert (counters["frames"]["total"], counters["stats"]["unique_graphs"]) == compiled
    assert_equal_pixels(np.concatenate([first, second]), made(cfg, planned(cfg, 0, 3), compile="none", compile_vae=False),
                        "tiny, compiled (inductor, CPU) against uncompiled")


@needs_cuda
@pytest.mark.slow
def test_cuda_graphs_compile_once_per_actor():
    """`--compile reduce-overhead` on a GPU: CUDA graphs of the UNet, captured on the first batch, replayed after."""
    from torch._dynamo.utils import counters

    cfg = tiny(generate={"fast": True, "compile": "reduce-overhead", "steps": 4, "micro_batch": 2})
    generate = GenerateBatch(dataclasses.asdict(cfg), "cuda")
    first = generate(planned(cfg, 0, 2))["pixels"]
    compiled = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    second = generate(planned(cfg, 2, 3))["pixels"]
    assert (counters["frames"]["total"], counters["stats"]["unique_graphs"]) == compiled
    assert_equal_pixels(np.concatenate([first, second]), made(cfg, planned(cfg, 0, 3), "cuda", compile="none"),
                        "tiny, CUDA graphs against uncompiled")
