"""Deterministic seeds: every random draw is a pure function of the run seed and a key.

A seed derived from (run seed, step, rank) or (run seed, label, index) does not
depend on batching, worker count or order of execution, which is what makes
resumed runs equal uninterrupted ones and lets any image be re-made alone.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: Ray Data's decode workers derive seeds without it
    import torch


def derive_seed(*key: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(*key: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `derive_seed(*key)`."""
    import torch

    return torch.Generator(device=device).manual_seed(derive_seed(*key))
