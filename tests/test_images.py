"""lbgen.data.images: the stored encodings, lossless where promised, files named by class and index."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from lbgen.data.images import encode_images


def test_encode_png_is_lossless_and_names_files():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    out = encode_images({"pixels": pixels, "class_id": np.array(["n1", "n2"]), "index": np.array([3, 4])}, "png", 95)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(out["image_bytes"][1]))), pixels[1])
    assert list(out["image_path"]) == ["n1_00003.png", "n2_00004.png"]
    assert (out["height"][0], out["width"][0]) == (8, 6)
