"""Downstream classification sets: reading ImageFolder / Parquet sets, torchvision's by name (and, re-exported from
`lbgen.data.shapes`, the procedural shapes sets that `make_downstream` writes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lbgen.data.images import IMAGE_SUFFIXES
from lbgen.data.shapes import KINDS, SHAPE_CLASSES, make_downstream, render_shape  # noqa: F401  (the procedural sets)
from lbgen.data.torchvision_sets import is_torchvision, open_torchvision
from lbgen.data.transforms import ImageTransform, decode_pixels, image_blobs, transform_pixels
from lbgen.errors import DownstreamError  # noqa: F401  (raised here; defined with the others)

EVAL_SPLITS = ("test", "val", "validation")


# ---------------------------------------------------------------- reading


class ImageFolderImages:
    """`root/<class>/<image>` files, classes in sorted folder order (torchvision's ImageFolder rule)."""

    def __init__(self, root: Path):
        from torchvision.datasets import ImageFolder

        try:
            folder = ImageFolder(str(root), loader=lambda p: p, is_valid_file=lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
        except (FileNotFoundError, RuntimeError) as err:
            raise DownstreamError(f"{root}: not an ImageFolder ({err})") from None
        self.classes = list(folder.classes)
        self.paths = [p for p, _ in folder.samples]
        self.targets = np.asarray(folder.targets, dtype=np.int64)

    def pixels(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:
            return decode_pixels(f.read())


class ParquetImages:
    """Parquet files with `image` (struct with bytes, or binary) and integer `label` columns."""

    def __init__(self, files: list[Path]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for f in files:
            try:
                table = pq.read_table(f, columns=["image", "label"])
            except Exception as err:  # damaged file or missing columns
                raise DownstreamError(f"{f}: not a Parquet file with image and label columns ({err})") from None
            tables.append(table)
        table = pa.concat_tables(tables, promote_options="permissive")
        self.blobs = image_blobs(table.column("image"))
        self.targets = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
        self.classes = [str(i) for i in range(int(self.targets.max()) + 1)] if len(self.targets) else []

    def pixels(self, i: int) -> torch.Tensor:
        return decode_pixels(self.blobs[i])


class ArrayImages:
    """Images held in memory, as the other sets read them: (N, H, W, 3) uint8 `array` and (N,) `targets`."""

    def __init__(self, array: np.ndarray, targets: np.ndarray, classes: list[str]):
        self.array, self.targets, self.classes = array, np.asarray(targets, dtype=np.int64), list(classes)

    def pixels(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.array[i]).permute(2, 0, 1)


def _open_split(root: Path, split: str):
    folder = root / split
    if folder.is_dir():
        parquet = sorted(folder.glob("*.parquet"))
        return ParquetImages(parquet) if parquet else ImageFolderImages(folder)
    parquet = sorted((root / "data").glob(f"{split}-*.parquet")) or sorted(root.glob(f"{split}-*.parquet"))
    return ParquetImages(parquet) if parquet else None


def open_downstream(root: str | Path, data_root: str | Path = ".") -> tuple[object, object]:
    """(train, eval) image sets of a downstream dir: `train/` and the first of `test/`, `val/`, `validation/`;
    or of `torchvision:NAME`, stored under `data_root` (`lbgen.data.torchvision_sets`).

    Each split is an ImageFolder or a folder of Parquet files (`image`, `label`); HF's
    `data/train-*.parquet` layout works too.
    """
    if is_torchvision(str(root)):
        return open_torchvision(str(root), data_root)
    root = Path(root)
    if not root.is_dir():
        raise DownstreamError(f"downstream dataset {root}: no such directory")
    train = _open_split(root, "train")
    evals = [s for s in (_open_split(root, name) for name in EVAL_SPLITS) if s is not None]
    if train is None or not evals:
        raise DownstreamError(f"downstream dataset {root}: needs train/ and one of {', '.join(EVAL_SPLITS)}/ (ImageFolder or Parquet)")
    if len(train.targets) == 0 or len(evals[0].targets) == 0:
        raise DownstreamError(f"downstream dataset {root}: a split has no images")
    return train, evals[0]


class TransformedImages(torch.utils.data.Dataset):
    """(uint8 (S, S, 3) tensor, label) pairs of an image set under `spec`; train crops seeded by (seed, epoch, index)."""

    def __init__(self, images, spec: ImageTransform, indices=None, seed: int = 0):
        self.images, self.spec, self.seed, self.epoch = images, spec, seed, 0
        self.indices = np.arange(len(images.targets)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        rng = np.random.default_rng([self.seed, self.epoch, j])
        pixels = transform_pixels(self.images.pixels(j), self.spec, rng)
        return torch.from_numpy(pixels), int(self.images.targets[j])


def dataset_name(dataset: str) -> str:
    """How results name a set: torchvision's name, or the directory's."""
    return dataset.split(":", 1)[1] if is_torchvision(dataset) else Path(dataset).name
