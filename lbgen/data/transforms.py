"""Image decode and augmentation shared by the pretrain loader, the benchmarks and evaluation.

`decode_pixels` turns encoded bytes into a (3, H, W) uint8 tensor with TorchCodec's
decoders (libjpeg-turbo, libpng, libwebp straight into a tensor), and
`transform_pixels` is the whole recipe on it (random resized crop + flip for training;
resize + centre crop for evaluation) with torchvision's antialiased uint8 resize: the
pixels of PIL's decode + bilinear resize (within rounding) at about 0.7x its CPU time
(benchmarks/RESULTS.md), which is what bounds a CPU decode stage. The result stays
uint8: normalisation happens on the training device (`normalize`), so the loader ships
a quarter of the bytes that float32 would take. Random draws come from a numpy
Generator passed in, never from a global RNG (torch's global seed is the same in every
fresh Ray worker process).

torch, torchvision and TorchCodec are imported by the functions that use them: Ray pickles
`decode_batch` and its `ImageTransform` into Ray Train's controller and Ray Data's coordinator
actors, which import this module to unpickle them but never decode (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from lbgen.data.shards import RowFilter, ShardError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ImageTransform:
    """Train (`train=True`) or eval preprocessing to a square `size` x `size` crop."""

    size: int
    train: bool
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image (for figures); raises ValueError when they do not decode."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ... for damaged data
        raise ValueError(f"image bytes do not decode ({type(err).__name__}: {err})") from None
    return image.convert("RGB")


def decode_pixels(data: bytes) -> torch.Tensor:
    """Encoded bytes -> (3, H, W) uint8 RGB tensor; raises ValueError when they do not decode.

    JPEG, PNG, WebP and GIF go through TorchCodec (16-bit PNGs scaled to 8 bits, the first
    frame of an animation); other formats (BMP, TIFF, ... in a downstream ImageFolder) and
    anything TorchCodec refuses through PIL, which also words the error for damaged data.
    """
    import torch
    from torchcodec.decoders import decode_image as codec_decode

    try:
        pixels = codec_decode(data, mode="RGB")
    except (ValueError, RuntimeError):
        return torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)
    return pixels[0] if pixels.ndim == 4 else pixels


def random_resized_box(width: int, height: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: torchvision's RandomResizedCrop.get_params, seeded by `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # Fallback, as torchvision: the centre crop closest to the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int, crop_pct: float) -> tuple[int, int, int, int]:
    """Centre square covering `crop_pct` of the shorter side (resize-then-centre-crop as one box)."""
    side = min(width, height) * crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return round(left), round(top), round(left + side), round(top + side)


def transform_pixels(pixels: torch.Tensor, spec: ImageTransform, rng: np.random.Generator) -> np.ndarray:
    """(3, H, W) uint8 -> (size, size, 3) uint8 after the train or eval recipe of `spec`."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    _, height, width = pixels.shape
    if spec.train:
        left, top, right, bottom = random_resized_box(width, height, spec.crop_scale, spec.crop_ratio, rng)
    else:
        left, top, right, bottom = center_box(width, height, spec.crop_pct)
    # Crop and resample in one call; antialias as PIL's bilinear does when shrinking.
    out = F.resized_crop(pixels, top, left, bottom - top, right - left, [spec.size, spec.size], InterpolationMode.BILINEAR, antialias=True)
    if spec.train and rng.random() < spec.hflip:
        out = F.horizontal_flip(out)
    return out.permute(1, 2, 0).numpy()


class Normalize:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 on `device`, normalised by `mean` and `std`.

    The constants are made on the device once, not per batch (a host-to-device copy each step).
    """

    def __init__(self, mean, std, device="cpu"):
        import torch

        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        return x.sub_(self.mean).div_(self.std)


def image_blobs(column) -> list:
    """The encoded images of an `image` column: a struct with `bytes` (the Hugging Face Image convention) or plain binary."""
    return (pc.struct_field(column, "bytes") if pa.types.is_struct(column.type) else column).to_pylist()


def decode_batch(table: pa.Table, spec: ImageTransform, rows: RowFilter, split: str, seed=None) -> dict[str, np.ndarray]:
    """A Ray Data batch of shard rows -> {"image": (B, S, S, 3) uint8, "label": (B,) int64} of `split`'s rows.

    `seed` fixes the random crops (tests); None, as in Ray Data, draws fresh OS entropy per
    batch so that workers never repeat each other's crops. A row whose image does not decode
    raises ShardError naming its file and index.
    """
    table = rows.select(table, split)
    images = np.empty((table.num_rows, spec.size, spec.size, 3), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    data = image_blobs(table.column("image"))
    for i, blob in enumerate(data):
        try:
            if blob is None:
                raise ValueError("image bytes are null")
            images[i] = transform_pixels(decode_pixels(blob), spec, rng)
        except ValueError as err:
            where = table.column("path")[i].as_py() if "path" in table.column_names else "shard"
            raise ShardError(f"{where}: row index {table.column('index')[i].as_py()}: {err}") from None
    return {"image": images, "label": table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)}
