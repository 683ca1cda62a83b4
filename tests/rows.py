"""Test helper: two generated rows are the same row, up to the rounding of their CLIP/IQA outputs."""

from __future__ import annotations

import numpy as np

# Model outputs: CLIP/IQA kernels round differently with the batch size, so these match up to rounding.
SCORES = ("clip_score", "iqa_score")
EMBEDDING = "clip_embedding"


def assert_same_row(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    """Every other column equal; scores within float32 rounding, the float16 embedding within its last bits."""
    ignore = set(skip) | set(SCORES) | {EMBEDDING}
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
    np.testing.assert_allclose([a[k] for k in SCORES], [b[k] for k in SCORES], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a[EMBEDDING], b[EMBEDDING], rtol=0, atol=2e-3)
