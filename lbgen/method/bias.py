"""Bias metrics on ImageNet-9-style background sets (Xiao et al., "Noise or Signal").

A set has `original/` (and `original/train/` to fit a classifier), `mixed_same/`
(foregrounds on backgrounds of the same class) and `mixed_rand/` (on backgrounds of
random classes). The background gap BG_Gap = acc(mixed_same) - acc(mixed_rand)
measures how much a model leans on the background: lower is less biased.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lbgen.errors import BiasDataError  # noqa: F401  (raised here; defined with the others)

IN9_VARIANTS = ("original", "mixed_same", "mixed_rand")
IN9_EVAL_SPLITS = ("val", "test")


def accuracy(predictions, targets) -> float:
    """Top-1 accuracy in percent of integer `predictions` against `targets` (same length, not empty)."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape or predictions.size == 0:
        raise ValueError(f"need equally long, non-empty predictions and targets, got {predictions.shape} and {targets.shape}")
    return float((predictions == targets).mean() * 100)


def background_gap(results: Mapping[str, tuple]) -> dict[str, float]:
    """Accuracies (percent) per variant and `bg_gap` = acc(mixed_same) - acc(mixed_rand).

    `results` maps variant name -> (predictions, targets); `mixed_same` and `mixed_rand`
    are required, any other variant (e.g. `original`) is reported alongside.
    """
    missing = [v for v in ("mixed_same", "mixed_rand") if v not in results]
    if missing:
        raise ValueError(f"background gap needs {', '.join(missing)}")
    out = {name: accuracy(*pair) for name, pair in results.items()}
    out["bg_gap"] = out["mixed_same"] - out["mixed_rand"]
    return out


def in9_folders(root: str | Path) -> dict[str, Path]:
    """{"train": original/train, "original"|"mixed_same"|"mixed_rand": <variant>/val (or test)} of `root`."""
    root = Path(root)
    folders = {"train": root / "original" / "train"}
    for variant in IN9_VARIANTS:
        found = [root / variant / s for s in IN9_EVAL_SPLITS if (root / variant / s).is_dir()]
        if not found:
            raise BiasDataError(f"bias set {root}: no {variant}/val/ or {variant}/test/ (ImageNet-9 layout expected)")
        folders[variant] = found[0]
    if not folders["train"].is_dir():
        raise BiasDataError(f"bias set {root}: no original/train/ to fit the linear classifier on")
    return folders
