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

`load_crop` draws an eval crop from the image header first, so that a JPEG whose crop is at
least twice the output side decodes at reduced size (draft mode). With
`pretrain.decode_device: cuda` the CPU stage (`plan_batch`) only draws the crops, and
`DeviceDecoder` decodes (nvJPEG) and crops on the training GPU: the same boxes, flips and
resampling, so the two paths give the same pixels up to the decoders' rounding.

torch, torchvision and TorchCodec are imported by the functions that use them: Ray pickles
`decode_batch` and its `ImageTransform` into Ray Train's controller and Ray Data's coordinator
actors, which import this module to unpickle them but never decode (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
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


def undecodable(err: Exception) -> ValueError:
    """The one wording of bytes that PIL could not decode (it raises OSError, SyntaxError, ... for damaged data)."""
    return ValueError(f"image bytes do not decode ({type(err).__name__}: {err})")


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image (for figures); raises ValueError when they do not decode."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ... for damaged data
        raise undecodable(err) from None
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


def crop_box(width: int, height: int, spec: ImageTransform, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The crop of `spec`'s recipe on a `width` x `height` image: random resized (train) or centre (eval)."""
    if spec.train:
        return random_resized_box(width, height, spec.crop_scale, spec.crop_ratio, rng)
    return center_box(width, height, spec.crop_pct)


def draw_flip(spec: ImageTransform, rng: np.random.Generator) -> bool:
    """Whether to mirror the crop (train only; drawn after the box, so every path draws in one order)."""
    return bool(spec.train and rng.random() < spec.hflip)


def crop_resize(pixels: torch.Tensor, box: Sequence[int], flip: bool, size: int) -> torch.Tensor:
    """(3, H, W) uint8 on any device -> the (3, size, size) crop `box` (left, top, right, bottom), resampled
    bilinear with antialiasing (as PIL's bilinear does when shrinking), mirrored when `flip`."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    left, top, right, bottom = (int(v) for v in box)
    out = F.resized_crop(pixels, top, left, bottom - top, right - left, [size, size], InterpolationMode.BILINEAR, antialias=True)
    return F.horizontal_flip(out) if flip else out


def transform_pixels(pixels: torch.Tensor, spec: ImageTransform, rng: np.random.Generator) -> np.ndarray:
    """(3, H, W) uint8 -> (size, size, 3) uint8 after the train or eval recipe of `spec`."""
    _, height, width = pixels.shape
    box = crop_box(width, height, spec, rng)
    return crop_resize(pixels, box, draw_flip(spec, rng), spec.size).permute(1, 2, 0).numpy()


def draft_scale(box: Sequence[int], size: int) -> int:
    """The largest JPEG DCT scale (8, 4, 2; else 1) that still leaves the crop `box` at least `size` pixels a side."""
    side = min(box[2] - box[0], box[3] - box[1])
    return next((scale for scale in (8, 4, 2) if side / scale >= size), 1)


def load_crop(data: bytes, spec: ImageTransform, rng: np.random.Generator) -> np.ndarray:
    """Encoded bytes -> (size, size, 3) uint8 after `spec`'s recipe: `transform_pixels(decode_pixels(data))`,
    but a JPEG whose crop is at least twice the output side is decoded at 1/2, 1/4 or 1/8 size in the DCT
    domain (libjpeg's scaled IDCT through PIL's draft mode) and the box scaled to match.

    Draft mode saves the IDCT and the resize, not the entropy decoding, which dominates at high quality. So it
    is used for the eval recipe (1.3x the images/s per CPU of a full decode, 512 px q95 JPEGs to 224 px) and not
    for training crops: only about 1 in 10 random resized crops reaches 2x, and reading the header first cost
    more than those saved (0.83-0.96x; benchmarks/RESULTS.md, "The loader per CPU").
    Raises ValueError when the bytes do not decode.
    """
    if spec.train:
        return transform_pixels(decode_pixels(data), spec, rng)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
    except Exception:  # noqa: BLE001  not an image PIL knows: decode_pixels words the error or decodes it
        return transform_pixels(decode_pixels(data), spec, rng)
    box = crop_box(width, height, spec, rng)
    flip = draw_flip(spec, rng)
    scale = draft_scale(box, spec.size) if image.format == "JPEG" else 1
    if scale == 1:
        pixels = decode_pixels(data)
    else:
        import torch

        try:
            image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        except Exception as err:  # noqa: BLE001  PIL raises several types for damaged data
            raise undecodable(err) from None
        fx, fy = pixels.shape[2] / width, pixels.shape[1] / height
        box = (math.floor(box[0] * fx), math.floor(box[1] * fy), math.ceil(box[2] * fx), math.ceil(box[3] * fy))
    return crop_resize(pixels, box, flip, spec.size).permute(1, 2, 0).numpy()


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


def _per_row(table: pa.Table, work: Callable[[int, bytes], None]) -> None:
    """Run `work` on each row's encoded image; a row that is null or does not decode raises ShardError naming
    its file and index."""
    for i, blob in enumerate(image_blobs(table.column("image"))):
        try:
            if blob is None:
                raise ValueError("image bytes are null")
            work(i, blob)
        except ValueError as err:
            where = table.column("path")[i].as_py() if "path" in table.column_names else "shard"
            raise ShardError(f"{where}: row index {table.column('index')[i].as_py()}: {err}") from None


def _labels(table: pa.Table) -> np.ndarray:
    return table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)


def decode_batch(table: pa.Table, spec: ImageTransform, rows: RowFilter, split: str, seed=None) -> dict[str, np.ndarray]:
    """A Ray Data batch of shard rows -> {"image": (B, S, S, 3) uint8, "label": (B,) int64} of `split`'s rows.

    `seed` fixes the random crops (tests); None, as in Ray Data, draws fresh OS entropy per
    batch so that workers never repeat each other's crops.
    """
    table = rows.select(table, split)
    images = np.empty((table.num_rows, spec.size, spec.size, 3), dtype=np.uint8)
    rng = np.random.default_rng(seed)

    def crop(i: int, blob: bytes) -> None:
        images[i] = load_crop(blob, spec, rng)

    _per_row(table, crop)
    return {"image": images, "label": _labels(table)}


def plan_batch(table: pa.Table, spec: ImageTransform, rows: RowFilter, split: str, seed=None) -> dict[str, np.ndarray]:
    """`decode_batch` for decoding on the training GPU: the rows' encoded bytes, their crop boxes and flips, drawn
    as `decode_batch` draws them (from the image header alone), and labels. `DeviceDecoder` finishes the job."""
    table = rows.select(table, split)
    boxes = np.empty((table.num_rows, 4), dtype=np.int32)
    flips = np.empty(table.num_rows, dtype=bool)
    encoded = np.empty(table.num_rows, dtype=object)
    rng = np.random.default_rng(seed)

    def plan(i: int, blob: bytes) -> None:
        try:
            width, height = Image.open(io.BytesIO(blob)).size
        except Exception as err:  # noqa: BLE001  PIL raises several types for damaged data
            raise undecodable(err) from None
        boxes[i] = crop_box(width, height, spec, rng)
        flips[i] = draw_flip(spec, rng)
        encoded[i] = blob

    _per_row(table, plan)
    return {"encoded": encoded, "box": boxes, "flip": flips, "label": _labels(table)}


# Where training batches are decoded: `pretrain.decode_device` -> the Ray Data map of the CPU stage.
DECODE_STAGES: dict[str, Callable] = {"cpu": decode_batch, "cuda": plan_batch}


class DeviceDecoder:
    """`plan_batch`'s output -> {"image": (B, S, S, 3) uint8 on `device`, "label"}: nvJPEG through TorchCodec's
    batched `decode_jpeg` on a CUDA device (libjpeg-turbo on the CPU, for tests), then the same `crop_resize`.

    A batch that is not all baseline JPEG (a PNG or CMYK file in an ImageFolder) falls back to one image at a
    time, decoded on the CPU where the device refuses it.
    """

    def __init__(self, size: int, device):
        import torch

        self.size, self.device = size, torch.device(device)

    def _decode(self, encoded: list[bytes]) -> list:
        from torchcodec.decoders import decode_jpeg

        try:
            return decode_jpeg(encoded, mode="RGB", device=self.device)
        except (RuntimeError, ValueError):
            pixels = []
            for data in encoded:
                try:
                    pixels.append(decode_jpeg(data, mode="RGB", device=self.device))
                except (RuntimeError, ValueError):
                    pixels.append(decode_pixels(data).to(self.device))
            return pixels

    def __call__(self, batch: dict) -> dict:
        import torch

        crops = [crop_resize(pixels, box, bool(flip), self.size)
                 for pixels, box, flip in zip(self._decode(list(batch["encoded"])), batch["box"], batch["flip"])]
        return {"image": torch.stack(crops).permute(0, 2, 3, 1), "label": torch.as_tensor(batch["label"])}
