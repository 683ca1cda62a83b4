"""The `classify` protocol: a pre-trained backbone's own classifier on real images of its own classes.

This is the paper's IN-val column: no further training, the backbone's logits over its class table
and top-1 / top-5 accuracy against labels that name classes by `class_id`, as ImageNet's validation
set does with WordNet ids. The labelled set is an ImageFolder whose folders are class ids (ImageNet's
`val/n01440764/...` layout), or Parquet files with `image` and `class_id` columns; a directory holding
an eval split (`val/`, `test/`, `validation/`) is read there. Classes the backbone was not trained on
are refused, named, before anything runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lbgen.data.downstream import EVAL_SPLITS, ImageFolderImages, TransformedImages, dataset_name
from lbgen.data.transforms import Normalize, decode_pixels, image_blobs
from lbgen.errors import DownstreamError
from lbgen.models.backbones import backbone_classes, load_backbone

TOP_K = 5


class KeyedParquetImages:
    """Parquet files with an `image` column (struct with bytes, or binary) and a string `class_id` column."""

    def __init__(self, files: list[Path]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.concat_tables([pq.read_table(f, columns=["image", "class_id"]) for f in files], promote_options="permissive")
        except Exception as err:  # damaged file or missing columns
            raise DownstreamError(f"{files[0].parent}: not Parquet files with image and class_id columns ({err})") from None
        self.blobs = image_blobs(table.column("image"))
        ids = [str(c) for c in table.column("class_id").to_pylist()]
        self.classes = sorted(set(ids))
        position = {c: i for i, c in enumerate(self.classes)}
        self.targets = np.asarray([position[c] for c in ids], dtype=np.int64)

    def pixels(self, i: int) -> torch.Tensor:
        return decode_pixels(self.blobs[i])


def open_keyed(root: str | Path):
    """The labelled images of `root` (or of its eval split), with `classes` = the class ids they name."""
    root = Path(root)
    if not root.is_dir():
        raise DownstreamError(f"labelled set {root}: no such directory")
    folder = next((root / s for s in EVAL_SPLITS if (root / s).is_dir()), root)
    parquet = sorted(folder.glob("*.parquet"))
    images = KeyedParquetImages(parquet) if parquet else ImageFolderImages(folder)
    if len(images.targets) == 0:
        raise DownstreamError(f"labelled set {folder}: no images")
    return images


def class_map(images, known: list[str], where: str, spec: str) -> np.ndarray:
    """For each class of `images`, its output index in the backbone's classes `known`; refuses unknown ones."""
    position = {c: i for i, c in enumerate(known)}
    unknown = [c for c in images.classes if c not in position]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DownstreamError(f"labelled set {where}: {len(unknown)} class(es) the backbone {spec} was not trained on: {shown} "
                              "(folders or class_id values must be class ids of its class table)")
    return np.asarray([position[c] for c in images.classes], dtype=np.int64)


def check_set(dataset: str, specs: list[str]) -> None:
    """Refuse, before anything runs, a set naming classes outside any backbone's table (the set is read once)."""
    images = open_keyed(dataset)
    for spec in specs:
        class_map(images, backbone_classes(spec), dataset, spec)


@torch.no_grad()
def top_k_hits(backbone, images, outputs: np.ndarray, size: int | None, batch_size: int, workers: int, device) -> np.ndarray:
    """(N, k) bool, k = min(TOP_K, outputs): whether each image's label is the backbone's k-th guess over all its outputs."""
    model = backbone.model.to(device).eval()
    data = TransformedImages(images, backbone.eval_transform(size))
    normalize, hits = Normalize(backbone.mean, backbone.std, device), []
    for pixels, targets in torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers):
        logits = model(normalize(pixels)).float().cpu()
        guesses = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices
        truth = torch.from_numpy(outputs[targets.numpy()])
        hits.append(guesses == truth[:, None])
    return torch.cat(hits).numpy()


def summarise(hits: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict:
    """Top-1 and top-5 accuracy (percent) over all images, and top-1 per class."""
    top1 = hits[:, 0]
    per_class = {c: {"images": int((targets == i).sum()), "top1": round(100.0 * float(top1[targets == i].mean()), 2)}
                 for i, c in enumerate(classes) if (targets == i).any()}
    return {"images": len(targets), "classes": len(per_class), "top1": round(100.0 * float(top1.mean()), 2),
            "top5": round(100.0 * float(hits.any(axis=1).mean()), 2), "per_class": per_class}


class ClassifyProtocol:
    """The backbone's own classifier applied as trained: one record per (backbone, labelled set)."""

    section = "classify"  # where results.json keeps its records

    @staticmethod
    def run(cfg, spec: str, dataset: str, device) -> list[dict]:
        ev, started = cfg.evaluate, time.perf_counter()
        images = open_keyed(dataset)
        outputs = class_map(images, backbone_classes(spec), dataset, spec)
        backbone = load_backbone(spec, cfg.seed, classifier=True)
        hits = top_k_hits(backbone, images, outputs, ev.eval_image_size, ev.eval_batch_size, ev.loader_workers, device)
        record = {"backbone": spec, "dataset": dataset_name(dataset), **summarise(hits, images.targets, images.classes)}
        return [{**record, "seconds": round(time.perf_counter() - started, 2)}]
