"""lbgen.data.transforms: decoding to tensors and the train/eval recipe, against PIL as the reference."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from lbgen.data import transforms
from lbgen.data.shards import RowFilter
from lbgen.data.transforms import (
    DeviceDecoder,
    ImageTransform,
    center_box,
    decode_batch,
    decode_image,
    decode_pixels,
    load_crop,
    plan_batch,
    random_resized_box,
    transform_pixels,
)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth image with edges (a JPEG of noise would test the codec, not the transform)."""
    y, x = np.mgrid[0:96, 0:128]
    pixels = np.stack([x * 2, y * 2, ((x // 16 + y // 16) % 2) * 200], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "P"), ("WEBP", "RGB"), ("BMP", "RGB")])
def test_decode_pixels_equals_pil(photo, fmt, mode):
    data = encoded(photo.convert(mode), fmt)
    pixels = decode_pixels(data)
    assert pixels.shape == (3, 96, 128) and str(pixels.dtype) == "torch.uint8"
    np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), np.asarray(decode_image(data)))


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_undecodable_bytes_are_a_value_error(photo, data):
    data = encoded(photo, "JPEG")[:200] if data is None else data  # None: a truncated JPEG
    with pytest.raises(ValueError, match="image bytes do not decode"):
        decode_pixels(data)


@pytest.mark.parametrize("train", [True, False])
def test_recipe_matches_pil_resize_of_the_same_box(photo, train):
    """The tensor path gives PIL's bilinear resize of the same crop, within rounding."""
    spec = ImageTransform(size=40, train=train, hflip=0.0)
    for seed in range(5):
        out = transform_pixels(decode_pixels(encoded(photo, "PNG")), spec, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        box = random_resized_box(128, 96, spec.crop_scale, spec.crop_ratio, rng) if train else center_box(128, 96, spec.crop_pct)
        reference = np.asarray(photo.resize((40, 40), Image.BILINEAR, box=box))
        assert out.shape == (40, 40, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - reference.astype(int)).mean() < 1.0


def test_crops_follow_the_generator_seed(photo):
    pixels, spec = decode_pixels(encoded(photo, "PNG")), ImageTransform(size=32, train=True)
    same = [transform_pixels(pixels, spec, np.random.default_rng(7)) for _ in range(2)]
    other = transform_pixels(pixels, spec, np.random.default_rng(8))
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], other)


def test_flip_mirrors_the_crop(photo):
    pixels = decode_pixels(encoded(photo, "PNG"))
    kept = transform_pixels(pixels, ImageTransform(size=32, train=True, hflip=0.0), np.random.default_rng(3))
    flipped = transform_pixels(pixels, ImageTransform(size=32, train=True, hflip=1.0), np.random.default_rng(3))
    np.testing.assert_array_equal(flipped, kept[:, ::-1])


# ---------------------------------------------------------------- reduced-size JPEG decode


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


@pytest.fixture(scope="module")
def big_photo(photo) -> bytes:
    """A 512 x 384 JPEG at quality 95: crops of 224 from it reach the 2x that draft mode needs."""
    return encoded(photo.resize((512, 384), Image.BICUBIC), "JPEG", quality=95)


def test_an_eval_crop_twice_the_output_decodes_at_reduced_size_with_the_same_picture(big_photo, monkeypatch):
    """Eval's 336-px centre crop to 112 px skips the full-size decode and gives the full decode's picture within
    resampling (PSNR >= 30 dB). Training crops always decode whole: few reach 2x, and the header read cost more."""
    full_decodes = []
    monkeypatch.setattr(transforms, "decode_pixels", lambda data: full_decodes.append(1) or decode_pixels(data))
    clean = ImageTransform(size=112, train=False)
    out = load_crop(big_photo, clean, np.random.default_rng(0))
    assert not full_decodes
    assert out.shape == (112, 112, 3) and psnr(out, transform_pixels(decode_pixels(big_photo), clean, None)) >= 30
    train = ImageTransform(size=112, train=True, crop_scale=(0.9, 1.0))
    for seed in range(3):
        np.testing.assert_array_equal(load_crop(big_photo, train, np.random.default_rng(seed)),
                                      transform_pixels(decode_pixels(big_photo), train, np.random.default_rng(seed)))
    assert len(full_decodes) == 3


def test_draft_scale_keeps_the_crop_at_least_the_output_side():
    assert transforms.draft_scale((0, 0, 447, 500), 224) == 1
    assert transforms.draft_scale((0, 0, 448, 500), 224) == 2
    assert transforms.draft_scale((10, 10, 906, 906), 224) == 4
    assert transforms.draft_scale((0, 0, 2000, 1800), 224) == 8


def test_load_crop_words_undecodable_bytes_as_a_value_error(big_photo):
    for data in (b"not an image", big_photo[:300]):
        with pytest.raises(ValueError, match="image bytes do not decode"):
            load_crop(data, ImageTransform(size=64, train=False), np.random.default_rng(0))


# ---------------------------------------------------------------- decoding on the training device


def image_rows(blobs: list[bytes]) -> pa.Table:
    return pa.table({"image": pa.array([{"bytes": b, "path": None} for b in blobs]), "label": pa.array(range(len(blobs)), pa.int64()),
                     "index": pa.array(range(len(blobs)), pa.int64())})


ALL_TRAIN = RowFilter(seed=0, val_fraction=0.0)


@pytest.mark.parametrize("train", [True, False])
def test_plan_then_device_decode_gives_the_cpu_stages_pixels(photo, train):
    """plan_batch + DeviceDecoder (here on the CPU: torchvision's libjpeg-turbo) draws the same boxes and flips as
    decode_batch and gives its pixels exactly, at sizes where no crop is drafted; PNG rows fall back per image."""
    blobs = [encoded(photo.rotate(15 * k), "JPEG", quality=90) for k in range(5)] + [encoded(photo, "PNG")]
    spec = ImageTransform(size=64, train=train)
    rows = image_rows(blobs)
    on_cpu = decode_batch(rows, spec, ALL_TRAIN, "train", seed=3)
    planned = plan_batch(rows, spec, ALL_TRAIN, "train", seed=3)
    on_device = DeviceDecoder(64, "cpu")(planned)
    assert on_device["image"].dtype == torch.uint8 and on_device["image"].shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(on_device["image"].numpy(), on_cpu["image"])
    np.testing.assert_array_equal(on_device["label"].numpy(), on_cpu["label"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_nvjpeg_decode_on_cuda_matches_the_cpu_stage(photo):
    blobs = [encoded(photo.rotate(15 * k), "JPEG", quality=90) for k in range(8)]
    spec = ImageTransform(size=64, train=True)
    on_cpu = decode_batch(image_rows(blobs), spec, ALL_TRAIN, "train", seed=5)["image"]
    on_gpu = DeviceDecoder(64, "cuda")(plan_batch(image_rows(blobs), spec, ALL_TRAIN, "train", seed=5))["image"]
    assert on_gpu.device.type == "cuda"
    assert np.abs(on_gpu.cpu().numpy().astype(int) - on_cpu.astype(int)).mean() < 1.0
