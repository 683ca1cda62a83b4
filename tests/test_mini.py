"""The shipped miniature (lbgen/weights/mini, made by scripts/train_mini.py) and the `mini` preset's data.

The weights must be the ones the manifest names (sha256), fit the size budget, and load through the
project's factories; a missing one fails at once, saying how to remake it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lbgen.models import shipped

MB = 1_000_000
BUDGET_BYTES = 25 * MB


def test_shipped_files_match_their_manifest():
    manifest = shipped.manifest("mini")
    assert shipped.mismatches("mini") == []
    assert manifest["command"].startswith("python scripts/train_mini.py")
    sizes = [(shipped.WEIGHTS_ROOT / "mini" / rel).stat().st_size for rel in manifest["files"]]
    assert sum(sizes) == manifest["bytes"] <= BUDGET_BYTES


def test_weights_are_fp16_safetensors():
    from safetensors import safe_open

    files = sorted((shipped.WEIGHTS_ROOT / "mini").rglob("*.safetensors"))
    assert len(files) == 5  # unet, vae, text encoder, CLIP, IQA
    for path in files:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}, path


def test_generator_loads_with_diffusers_and_the_factory():
    from diffusers import StableDiffusionPipeline

    from lbgen.models.generator import create_generator

    direct = StableDiffusionPipeline.from_pretrained(shipped.shipped_dir("mini", "generator"))
    assert direct.vae.config.scaling_factor != 0.18215  # the latents' own scale, measured by the training
    pipe = create_generator("mini")
    tokens = pipe.tokenizer(["Trouser", "Ankle boot"], padding="max_length", return_tensors="pt").input_ids
    assert not torch.equal(tokens[0], tokens[1])  # the real CLIP BPE, not the 2-token trap
    images = pipe(["Trouser", "Bag"], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_clip_loads_through_the_factory():
    from lbgen.models.clip import create_clip, load_clip_dir

    clip = create_clip("mini")
    same_dir = load_clip_dir(shipped.shipped_dir("mini", "clip"))
    text = clip.encode_text(["photo of Trouser", "photo of Bag"])
    assert text.shape == (2, clip.embed_dim) and not torch.allclose(text[0], text[1])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image = clip.encode_image(pixels)
    assert image.shape == (2, clip.embed_dim) and torch.allclose(image, same_dir.encode_image(pixels))


def test_iqa_loads_scores_and_passes_gradients():
    from lbgen.models.iqa import create_iqa, has_pixel_gradient

    quality = create_iqa("mini")
    assert has_pixel_gradient(quality)
    assert not quality.lower_better and quality.score_range == (0.0, 1.0)


def test_missing_weights_fail_fast(monkeypatch, tmp_path):
    from lbgen.errors import ModelNotFoundError
    from lbgen.models.clip import create_clip
    from lbgen.models.generator import check_generator, create_generator
    from lbgen.models.iqa import create_iqa

    monkeypatch.setattr(shipped, "WEIGHTS_ROOT", tmp_path)
    started = time.perf_counter()
    for load in (lambda: check_generator("mini"), lambda: create_generator("mini"), lambda: create_clip("mini"), lambda: create_iqa("mini")):
        with pytest.raises(ModelNotFoundError, match="scripts/train_mini.py"):
            load()
    assert time.perf_counter() - started < 5


def test_fashion_mnist_downstream_from_the_shipped_subset(monkeypatch, tmp_path):
    """Without Debian's files the shipped subset (100 + 100 per class) is read; folders are fashion10's class ids."""
    from lbgen.data import fashion_mnist
    from lbgen.data.classes import load_class_table
    from lbgen.data.shapes import make_downstream

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "absent"))
    monkeypatch.delenv(fashion_mnist.ENV_DIR, raising=False)
    assert fashion_mnist.source_dir() == fashion_mnist.SHIPPED_DIR
    out = make_downstream("fashion-mnist", tmp_path / "set", train_per_class=3, test_per_class=1000, size=32, seed=0)
    table = load_class_table("fashion10")
    for split, per_class in (("train", 3), ("test", 100)):
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == sorted(table.ids)
        assert {len(list((out / split / f).glob("*.png"))) for f in folders} == {per_class}
    assert (fashion_mnist.SHIPPED_DIR / "LICENSE").read_text().count("Zalando SE") == 1


def test_shipped_subset_is_real_fashion_mnist():
    """The subset holds the images Debian's files hold at the seeded indices (where those files are installed)."""
    from lbgen.data import fashion_mnist

    if not Path(fashion_mnist.DEBIAN_DIR, "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    for split in ("train", "test"):
        full, labels = fashion_mnist.load_split(split, Path(fashion_mnist.DEBIAN_DIR))
        subset, subset_labels = fashion_mnist.load_split(split, fashion_mnist.SHIPPED_DIR)
        keep = fashion_mnist.per_class_sample(labels, 100, seed=0)
        assert np.array_equal(full[keep], subset) and np.array_equal(labels[keep], subset_labels)


def test_mini_preset_points_at_the_shipped_models():
    from lbgen.config import resolve_with_preset
    from lbgen.data.classes import load_class_table

    cfg, preset = resolve_with_preset("mini")
    assert preset == "mini"
    assert (cfg.model.generator, cfg.model.clip, cfg.model.iqa, cfg.model.resolution) == ("mini", "mini", "mini", 32)
    assert load_class_table(cfg.classes).names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                                   "Sneaker", "Bag", "Ankle boot")
    assert cfg.make_downstream.kind == "fashion-mnist" and cfg.evaluate.also_classify


# ---------------------------------------------------------------- a real signal
# What the shipped models do to real images. Each threshold sits under the value measured on this host (the
# note of issue 23 gives both); a broken model or sampler lands near chance (10 %, 50 % for pairs), far under it.
OWN_CLASS_SHARE_MIN = 0.60
REAL_TOP1_MIN = 0.35
QUALITY_RANKED_MIN = 0.90


@pytest.fixture(scope="module")
def mini_config():
    from lbgen.config.io import resolve

    return resolve("mini", overrides={"generate": {"images_per_class": 20, "batch_size": 100, "micro_batch": 50}})


@pytest.fixture(scope="module")
def generated_rows(mini_config):
    """The `mini` preset's first 200 images, through the generation and scoring callables that Ray Data maps."""
    import dataclasses

    from lbgen.data.classes import load_class_table
    from lbgen.stages.generate import GenerateBatch, ScoreBatch, plan

    config = dataclasses.asdict(mini_config)
    rows = plan(load_class_table(mini_config.classes), mini_config)
    batch = {key: np.array([row[key] for row in rows]) for key in ("label", "seed", "prompt")}
    return ScoreBatch(config)(GenerateBatch(config)(batch))


@pytest.mark.slow
def test_generated_images_are_recognised_by_the_clip_trained_on_real_images(generated_rows):
    share = float(generated_rows["clip_agrees"].mean())
    print(f"generated images the mini CLIP assigns to their own class: {share:.3f} (chance 0.1)")
    assert share >= OWN_CLASS_SHARE_MIN


@pytest.mark.slow
def test_a_backbone_trained_only_on_generated_images_classifies_real_test_images(mini_config, generated_rows):
    from lbgen.data.classes import load_class_table
    from lbgen.data.downstream import ArrayImages
    from lbgen.data.fashion_mnist import SHIPPED_DIR, load_split, padded_rgb
    from lbgen.stages.pretrain import memory_batches, pretrain_in_memory

    classes = list(load_class_table(mini_config.classes).ids)  # Fashion-MNIST's own labels, "0".."9"
    trainer = pretrain_in_memory(mini_config, ArrayImages(generated_rows["pixels"], generated_rows["label"], classes))
    images, labels = load_split("test", SHIPPED_DIR)  # 1,000 real test images, the same on every machine
    real = ArrayImages(padded_rgb(images), labels, classes)
    top1 = trainer.evaluate(memory_batches(real, mini_config, train=False, batch_size=500))["val_acc"]
    print(f"synthetic-to-real top-1 on {len(labels)} real test images: {top1:.3f} (chance 0.1)")
    assert top1 >= REAL_TOP1_MIN


def test_the_quality_model_ranks_real_images_above_their_noisy_and_blurred_copies():
    """L_q's signal: on 200 real test images, the shipped IQA scores each original above its copy with Gaussian
    noise (sigma 0.1) and above its copy blurred (5 x 5, sigma 1)."""
    from torchvision.transforms.v2.functional import gaussian_blur

    from lbgen.data.fashion_mnist import SHIPPED_DIR, load_split, padded_rgb
    from lbgen.models.iqa import create_iqa

    quality = create_iqa("mini")
    images, _ = load_split("test", SHIPPED_DIR)
    real = torch.from_numpy(padded_rgb(images[:200])).permute(0, 3, 1, 2).float() / 255
    noisy = (real + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    blurred = gaussian_blur(real, [5, 5], [1.0, 1.0])
    with torch.no_grad():
        scores = {name: quality(x) for name, x in (("real", real), ("noisy", noisy), ("blurred", blurred))}
    for copy in ("noisy", "blurred"):
        share = float((scores["real"] > scores[copy]).float().mean())
        print(f"real scored above its {copy} copy: {share:.3f} of 200 pairs")
        assert share >= QUALITY_RANKED_MIN, copy
