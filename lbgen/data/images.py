"""The stored image encodings of a generated dataset (`generate.image_format`, named in
`lbgen.config.choices`) and the encode step of `generate` that uses them.
"""

from __future__ import annotations

import io

from lbgen.config.choices import IMAGE_FORMATS  # `generate.image_format` -> (PIL format, file extension)

# The file suffixes read as images in a folder of them (an ImageFolder tree, for pre-training or a downstream set).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def encode_images(batch: dict, image_format: str, quality: int) -> dict:
    """`pixels` (B, H, W, 3) uint8 -> encoded `image_bytes`, a file name `image_path`, `height`, `width`."""
    import numpy as np
    from PIL import Image

    pil_format, ext = IMAGE_FORMATS[image_format]
    options = {} if pil_format == "PNG" else {"quality": quality}
    blobs, paths = [], []
    for pixels, class_id, index in zip(batch["pixels"], batch["class_id"], batch["index"]):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=pil_format, **options)
        blobs.append(buffer.getvalue())
        paths.append(f"{class_id}_{int(index):05d}.{ext}")
    out = {k: v for k, v in batch.items() if k != "pixels"}
    shape = batch["pixels"].shape
    out.update(image_bytes=np.array(blobs, dtype=object), image_path=np.array(paths, dtype=object),
               height=np.full(shape[0], shape[1], np.int32), width=np.full(shape[0], shape[2], np.int32))
    return out
