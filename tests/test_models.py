import time

import pytest
import torch

from lbgen.models import ModelNotFoundError, create_clip, create_generator, create_iqa
from lbgen.models.iqa import parse_score_range


@pytest.fixture(scope="module")
def tiny_pipe():
    return create_generator("tiny", resolution=64)


def _sample(pipe, seed=0):
    return pipe(
        ["tench", "church"], num_inference_steps=3, guidance_scale=2.0, height=64, width=64,
        output_type="pt", generator=torch.Generator().manual_seed(seed),
    ).images


def test_tiny_tokenizer_distinguishes_prompts_and_matches_open_clip(tiny_pipe):
    import open_clip

    tok = tiny_pipe.tokenizer
    a, b = tok(["a photo of a cat", "a dog"], padding="max_length", max_length=77).input_ids
    assert a != b
    reference = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat"])[0].tolist()
    assert a[:7] == reference[:7]


def test_tiny_generator_is_seeded(tiny_pipe):
    again = create_generator("tiny", resolution=64)
    assert torch.equal(_sample(tiny_pipe), _sample(again))
    assert not torch.equal(_sample(tiny_pipe, 0), _sample(tiny_pipe, 1))


def test_saved_pipeline_round_trips_through_the_local_loading_path(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "sd")
    loaded = create_generator(str(tmp_path / "sd"))
    assert torch.allclose(_sample(tiny_pipe), _sample(loaded), atol=1e-6)


@pytest.mark.parametrize(
    "factory, args",
    [
        (create_generator, ("nobody-xyz/no-such-model",)),
        (create_generator, ("/nonexistent/dir",)),
        (create_clip, ("ViT-B-32", "openai")),
        (create_clip, ("No-Such-Arch",)),
        (create_clip, ("ViT-B-32", "/nonexistent/w.safetensors")),
        (create_iqa, ("topiq_nr",)),
        (create_iqa, ("no_such_metric",)),
        (create_iqa, ("psnr",)),
    ],
)
def test_missing_models_fail_fast_with_how_to(factory, args, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache, whatever this machine holds
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        factory(*args)
    assert time.monotonic() - started < 20
    assert args[-1] in str(err.value) or args[0] in str(err.value)


def test_remote_code_metric_needs_explicit_trust():
    with pytest.raises(PermissionError, match="trust-remote-code"):
        create_iqa("qalign")


def test_clip_preprocessing_is_differentiable_and_normalised():
    clip = create_clip("tiny")
    images = torch.rand(2, 3, 48, 48, requires_grad=True)  # resized to 64 inside
    features = clip.encode_image(images)
    assert features.shape == (2, clip.embed_dim)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    features.sum().backward()
    assert images.grad.abs().sum() > 0
    text = clip.encode_text(["photo of tench", "photo of church"])
    assert text.shape == (2, clip.embed_dim) and not torch.allclose(text[0], text[1])
    assert all(not p.requires_grad for p in clip.parameters())


def test_iqa_scores_per_image_with_gradient():
    iqa = create_iqa("tiny")
    images = torch.rand(3, 3, 64, 64, requires_grad=True)
    score = iqa(images)
    assert score.shape == (3,)
    score.sum().backward()
    assert images.grad.abs().sum() > 0


def test_score_range_mapping():
    assert parse_score_range("~0, ~1") == (0.0, 1.0)
    assert parse_score_range("1, 5") == (1.0, 5.0)


def test_gradient_probe_tells_a_loss_from_a_detached_score():
    from lbgen.models.iqa import has_pixel_gradient

    assert has_pixel_gradient(create_iqa("tiny"))
    assert not has_pixel_gradient(create_iqa("piqe"))  # pyiqa's piqe: builds offline, no gradient


class StandInQAlign(torch.nn.Module):
    """Q-Align's scoring interface (`model(input_ids, images=...)["logits"]`, `preferential_ids_`) on a tiny net.

    Records what it is fed, so the test sees the wrapper's resize and normalisation.
    """

    preferential_ids_ = [7, 3, 5, 1, 9]  # excellent, good, fair, poor, bad

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(3, 10, 4, stride=4)
        self.seen = {}

    def forward(self, input_ids, images):
        self.seen.update(input_ids=input_ids, images=images.detach())
        pooled = self.net(images).mean(dim=(2, 3))  # (B, 10): one logit per vocabulary id
        return {"logits": pooled[:, None, :].repeat(1, input_ids.shape[1], 1)}


def test_qalign_wrapper_scores_batches_on_tensors_with_gradients_as_the_paper_maps_them():
    from lbgen.models.iqa import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, QAlignScore, Quality

    torch.manual_seed(0)
    model = StandInQAlign()
    quality = Quality(QAlignScore(model, torch.tensor([[1, 2, 3, 4]])), "qalign", lower_better=False, score_range=(0.0, 5.0))
    images = torch.rand(3, 3, 64, 64, requires_grad=True)
    score01 = quality(images)
    fed = model.seen["images"]
    assert fed.shape == (3, 3, 448, 448) and model.seen["input_ids"].shape == (3, 4)
    upsized = torch.nn.functional.interpolate(images.detach(), size=(448, 448), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(fed, (upsized - mean) / std)
    q = quality.raw(images).detach()
    assert ((1 <= q) & (q <= 5)).all() and len(set(q.tolist())) == 3  # one Q per image
    torch.testing.assert_close(score01.detach(), q / 5)  # L_q = 1 - Q/5
    (1 - score01).mean().backward()
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def test_sleep_generator_waits_like_a_gpu_and_returns_the_same_pixels_every_time():
    """`sleep:<ms>` (scale tests only): each UNet call takes the delay in wall time but not in CPU time,
    and the pipeline around it (decode, 512 px) is real and deterministic."""
    import dataclasses
    import time

    import numpy as np

    from lbgen.config import resolve
    from lbgen.data.classes import load_class_table
    from lbgen.data.plan import plan
    from lbgen.stages.generate import GenerateBatch

    cfg = resolve("tiny", overrides={"model": {"generator": "sleep:150", "resolution": 512},
                                     "generate": {"steps": 2, "micro_batch": 2, "batch_size": 2}})
    generate = GenerateBatch(dataclasses.asdict(cfg))
    rows = plan(load_class_table(cfg.classes), cfg)[:2]
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    wall, cpu = time.perf_counter(), time.process_time()
    pixels = generate(batch)["pixels"]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert pixels.shape == (2, 512, 512, 3) and pixels.std() > 1
    assert wall >= 2 * 0.150 and wall - cpu >= 0.8 * 2 * 0.150  # two UNet calls (T = 2) spent waiting, not computing
    np.testing.assert_array_equal(generate(batch)["pixels"], pixels)


@pytest.mark.parametrize("name", ["sleep:abc", "sleep:-5", "sleep:"])
def test_a_bad_sleep_delay_is_refused_naming_it(name):
    from lbgen.errors import ConfigError
    from lbgen.models.generator import check_generator

    with pytest.raises(ConfigError, match=f"model.generator '{name}': the delay must be milliseconds >= 0"):
        check_generator(name)


@pytest.mark.parametrize("generator", ["tiny", "mini"])
def test_samplers_follow_sd15s_own_scheduler_config(generator):
    """Samplers are built from the model's scheduler config: it must be SD 1.5's. Without `skip_prk_steps`,
    PNDM adds 9 Runge-Kutta UNet calls to any step count; without `set_alpha_to_one=False`, DDIM's last step
    differs from SD 1.5's; without `clip_sample=False`, DDIM clips its x0 estimate to [-1, 1]."""
    from lbgen.models.generator import create_scheduler

    config = create_generator(generator, resolution=32).scheduler.config
    pndm = create_scheduler("pndm", config)
    pndm.set_timesteps(10)
    assert len(pndm.timesteps) == 11  # PLMS with skip_prk_steps: one warm-up step, as SD 1.5's PNDM
    ddim = create_scheduler("ddim", config)
    assert (ddim.config.set_alpha_to_one, ddim.config.clip_sample) == (False, False)
    assert float(ddim.final_alpha_cumprod) == pytest.approx(float(ddim.alphas_cumprod[0]))
