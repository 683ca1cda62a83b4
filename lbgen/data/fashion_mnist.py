"""Real Fashion-MNIST as a downstream set (`make_downstream.kind: fashion-mnist`), numpy + PIL only.

Read from Debian's `dataset-fashion-mnist` files (`/usr/share/datasets/fashion-mnist`, or `$LBGEN_FASHION_MNIST`)
when present: then the whole test split is used. Without them, from the subset that ships in the package
(`lbgen/data/fashion_mnist/`: 100 train and 100 test images per class, Fashion-MNIST's MIT licence beside it).

Written as an ImageFolder whose folders are the class ids of the shipped `fashion10` table (the dataset's own
labels, "0".."9"): `train/` (a seeded per-class sample of the train split, for the linear probe) and `test/`
(the test split, up to `test_per_class` per class), so that the linear probe and the `classify` protocol
(a backbone's own classifier, keyed by class id) read the same set. Images are 28 px padded to 32, then
resized to `size`, grey replicated to RGB.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from lbgen.errors import DownstreamError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DIR = "LBGEN_FASHION_MNIST"
SHIPPED_DIR = Path(__file__).resolve().parent / "fashion_mnist"
SPLITS = {"train": "train", "test": "t10k"}  # our split name -> the idx files' prefix


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as an array: images (N, 28, 28) uint8, labels (N,) uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """`array` (uint8) as a gzipped idx file, the format `read_idx` reads (used to make the shipped subset)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes every time
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _idx_file(root: Path, prefix: str, kind: str) -> Path | None:
    stem = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    return next((root / name for name in (stem + ".gz", stem) if (root / name).is_file()), None)


def source_dir() -> Path:
    """Where the idx files are read from: $LBGEN_FASHION_MNIST, Debian's folder, else the shipped subset."""
    for candidate in (os.environ.get(ENV_DIR), DEBIAN_DIR):
        if candidate and all(_idx_file(Path(candidate), p, k) for p in SPLITS.values() for k in ("images", "labels")):
            return Path(candidate)
    return SHIPPED_DIR


def load_split(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels of `split` ("train" or "test")."""
    root = root or source_dir()
    files = [_idx_file(root, SPLITS[split], kind) for kind in ("images", "labels")]
    if not all(files):
        raise DownstreamError(f"{root}: no Fashion-MNIST {split} idx files ({SPLITS[split]}-images-idx3-ubyte[.gz] and labels)")
    return read_idx(files[0]), read_idx(files[1]).astype(np.int64)


def per_class_sample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of up to `per_class` images of every class, seeded, in ascending order."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def padded_rgb(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) grey -> (N, 32, 32, 3) uint8: padded by 2 px of background, grey replicated to RGB."""
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=3)


def _write_split(folder: Path, images: np.ndarray, labels: np.ndarray, size: int) -> None:
    from PIL import Image

    for label in np.unique(labels):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(padded_rgb(images), labels)):
        padded = Image.fromarray(image)
        (padded if size == 32 else padded.resize((size, size), Image.BICUBIC)).save(folder / str(label) / f"{i:05d}.png")


def write_fashion_mnist(output: Path, train_per_class: int, test_per_class: int, size: int, seed: int) -> None:
    """ImageFolder train/ (a seeded `train_per_class` sample of the train split) and test/ (the test split, up to
    `test_per_class` per class: the whole of it at 1000), folders named by class id."""
    root = source_dir()
    for split, per_class, name in (("train", train_per_class, "train"), ("test", test_per_class, "test")):
        images, labels = load_split(split, root)
        keep = per_class_sample(labels, per_class, seed)
        _write_split(Path(output) / name, images[keep], labels[keep], size)
