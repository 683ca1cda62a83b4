"""lbgen.data.transforms: decoding to tensors and the train/eval recipe, against PIL as the reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lbgen.data.transforms import (
    ImageTransform,
    center_box,
    decode_image,
    decode_pixels,
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
