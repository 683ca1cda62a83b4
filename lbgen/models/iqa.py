"""`create_iqa`: a no-reference pyiqa metric as a differentiable quality score in ~[0, 1].

The metric's own range and direction (pyiqa's `score_range`, `lower_better`) map
its raw score so that higher is better and ~[0, 1] covers the range. No clamping:
a clamp would cut the gradient exactly where the quality loss needs it.
"""

from __future__ import annotations

import logging
import pickle
from typing import Callable

import torch
from torch import nn

from lbgen.models.hub import UnsafeWeightsError, hub_access, not_found, refusal_reason, weights_only_loads

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# pyiqa metrics whose loading runs code downloaded from the hub.
REMOTE_CODE_METRICS = frozenset({"qalign", "qalign_4bit", "qalign_8bit", "compare2score"})

HOW_TO_PROVIDE = (
    "Use a pyiqa no-reference metric name (pyiqa.list_models(metric_mode='NR')) whose weights are in "
    "$TORCH_HOME/hub/pyiqa (or reachable), or --iqa tiny."
)


def parse_score_range(text: str | None) -> tuple[float, float]:
    """pyiqa's `score_range` string ("~0, ~1", "1, 5") -> (low, high); unknown -> (0, 1)."""
    if not text:
        return 0.0, 1.0
    low, high = (float(part.strip().lstrip("~")) for part in text.split(","))
    return low, high


class Quality(nn.Module):
    """Frozen IQA network; `forward(images in [0,1]) -> (B,) score01`, higher is better."""

    def __init__(self, metric: nn.Module, name: str, lower_better: bool, score_range: tuple[float, float]):
        super().__init__()
        self.metric = metric.eval().requires_grad_(False)
        self.name = name
        self.lower_better = lower_better
        self.score_range = score_range

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """The metric's own score per image, (B,)."""
        return self.metric(images.float()).reshape(images.shape[0], -1)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.score_range
        score01 = (self.raw(images) - low) / (high - low)
        return 1.0 - score01 if self.lower_better else score01


def _pyiqa_metric(name: str, device, **kwargs) -> nn.Module:
    import pyiqa

    # as_loss keeps the graph; reduction "none" keeps one score per image.
    return pyiqa.create_metric(name, as_loss=True, loss_reduction="none", device=torch.device(device), **kwargs)


def build_tiny(device="cpu", seed: int = 0) -> Quality:
    """pyiqa's CNNIQA network with seeded random weights: a real IQA architecture, no download."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        metric = _pyiqa_metric("cnniqa", device, pretrained=None)
    return Quality(metric, "tiny", lower_better=False, score_range=(0.0, 1.0))


IQA_BUILDERS: dict[str, Callable[..., Quality]] = {"tiny": build_tiny}


def create_iqa(
    name: str, *, device: str | torch.device = "cpu", seed: int = 0, trust_remote_code: bool = False
) -> Quality:
    """A frozen, differentiable `Quality` scorer from a builder name or a pyiqa NR metric.

    Raises:
        ModelNotFoundError: unknown metric, a full-reference metric, or weights unavailable.
        PermissionError: the metric runs remote code and `trust_remote_code` is off.
    """
    if name in IQA_BUILDERS:
        return IQA_BUILDERS[name](device=device, seed=seed)
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    if name not in DEFAULT_CONFIGS:
        raise not_found("IQA metric", name, HOW_TO_PROVIDE)
    cfg = DEFAULT_CONFIGS[name]
    if cfg.get("metric_mode") != "NR":
        raise not_found("no-reference IQA metric", name, f"{name!r} is full-reference. {HOW_TO_PROVIDE}")
    if name in REMOTE_CODE_METRICS and not trust_remote_code:
        raise PermissionError(
            f"IQA metric {name!r} runs code downloaded from the hub; pass --trust-remote-code to allow it"
        )
    with hub_access(), weights_only_loads():
        try:
            metric = _pyiqa_metric(name, device)
        except pickle.UnpicklingError as err:
            raise UnsafeWeightsError(f"IQA weights for {name!r} refused: the file holds objects other than tensors "
                                     f"({refusal_reason(err)}); lbgen loads weights with torch.load(weights_only=True) only") from None
        except (OSError, RuntimeError, ValueError) as err:
            raise not_found("IQA weights for", name, HOW_TO_PROVIDE, err) from None
    return Quality(metric, name, cfg.get("lower_better", False), parse_score_range(cfg.get("score_range")))
