"""`create_iqa`: a no-reference pyiqa metric as a differentiable quality score in ~[0, 1].

The metric's own range and direction (pyiqa's `score_range`, `lower_better`) map
its raw score so that higher is better and ~[0, 1] covers the range. No clamping:
a clamp would cut the gradient exactly where the quality loss needs it.

Q-Align (the paper's IQA) scores through PIL, one image at a time and under
`inference_mode` in pyiqa; `QAlignScore` scores it the way the lbGen authors do:
a batch of tensors, 448 px bicubic resize and CLIP normalisation, with gradients,
mapped as the paper's `L_q = 1 - Q/5`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lbgen.errors import refusal_reason
from lbgen.models.hub import UnsafeWeightsError, hub_access, not_found, weights_only_loads

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# pyiqa metrics whose loading runs code downloaded from the hub.
REMOTE_CODE_METRICS = frozenset({"qalign", "qalign_4bit", "qalign_8bit", "compare2score"})

HOW_TO_PROVIDE = (
    "Use a pyiqa no-reference metric name (pyiqa.list_models(metric_mode='NR')) whose weights are in "
    "$TORCH_HOME/hub/pyiqa (or reachable), a directory holding a MiniIQA's config.json + model.safetensors, "
    "--iqa mini (trained, shipped) or --iqa tiny (random)."
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


def has_pixel_gradient(quality: Quality, size: int = 224) -> bool:
    """Whether `quality`'s score carries a gradient to the pixels, probed on 2 random images.

    A metric without one (pyiqa's `piqe` is computed from detached statistics) would leave the
    quality loss a constant: it is logged but never trains anything.
    """
    device = next(quality.parameters(), torch.empty(0)).device
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
    score = quality(images).sum()
    if not score.requires_grad:
        return False
    (grad,) = torch.autograd.grad(score, images, allow_unused=True)
    return grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)


# Q-Align's prompt and its five rating words, best first, as `MPLUGOwl2LlamaForCausalLM.score` writes them.
QALIGN_PROMPT = "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"
QALIGN_LEVELS = (5.0, 4.0, 3.0, 2.0, 1.0)  # excellent, good, fair, poor, bad
QALIGN_SIZE = 448
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QAlignScore(nn.Module):
    """Q-Align's quality Q in [1, 5] for a batch of image tensors, differentiable (the lbGen authors' wrapper).

    `model` is Q-Align's causal LM (`model(input_ids, images=...)["logits"]`, `model.preferential_ids_`:
    the token ids of excellent..bad); `input_ids` (1, L) is the tokenised `QALIGN_PROMPT`. Images
    (B, 3, H, W) in [0, 1] are resized to 448 px (bicubic) and CLIP-normalised in torch, so no PIL
    round trip cuts the graph; Q is the softmax over the five rating tokens times 5..1.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("input_ids", input_ids.reshape(1, -1), persistent=False)
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("levels", torch.tensor(QALIGN_LEVELS), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = F.interpolate(images, size=(QALIGN_SIZE, QALIGN_SIZE), mode="bicubic", align_corners=False)
        pixels = (pixels - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        logits = self.model(self.input_ids.repeat(len(images), 1), images=pixels.to(dtype))["logits"]
        rating = logits[:, -1, list(self.model.preferential_ids_)].float()  # (B, 5)
        return torch.softmax(rating, dim=-1) @ self.levels


def qalign_scorer(metric: nn.Module) -> tuple[nn.Module, tuple[float, float]]:
    """pyiqa's Q-Align metric -> (`QAlignScore`, its range for `Quality`): (0, 5) gives the paper's Q/5."""
    from pyiqa.archs.q_align.modeling_mplug_owl2 import IMAGE_TOKEN_INDEX, tokenizer_image_token

    model = metric.net.model
    input_ids = tokenizer_image_token(QALIGN_PROMPT, model.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    return QAlignScore(model, input_ids), (0.0, 5.0)


# pyiqa metrics whose own forward cannot serve as a loss -> the differentiable scorer built from their network.
SCORERS: dict[str, Callable[[nn.Module], tuple[nn.Module, tuple[float, float]]]] = {
    name: qalign_scorer for name in ("qalign", "qalign_8bit", "qalign_4bit")
}


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


class MiniIQA(nn.Module):
    """A small no-reference quality CNN (`scripts/train_mini.py` trains it on real images against graded
    noise, blur, JPEG and contrast loss): (B, 3, H, W) in [0, 1] -> (B,) quality, ~1 clean, ~0 worst.

    Images of another size are resized (antialiased, differentiable) to the size it was trained at, so
    its scale of artefacts stays the one it learnt. Mean and max pooling of the last features: a local
    artefact (a blotch) counts as well as a global one (blur).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), size: int = 32):
        super().__init__()
        self.config = {"channels": list(channels), "size": size}
        layers, width = [], 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU()]
            layers += [nn.AvgPool2d(2)] if i < len(channels) - 1 else []
            width = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config["size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        h = self.features(images * 2 - 1)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)).squeeze(1)


# A local MiniIQA: its constructor arguments and its weights.
MINI_IQA_FILES = ("config.json", "model.safetensors")


def is_iqa_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), MINI_IQA_FILES[1]))


def load_iqa_dir(path: str | Path, name: str | None = None, device="cpu") -> Quality:
    """A `Quality` from a directory holding MINI_IQA_FILES (safetensors, cast to fp32); its score is already
    higher-better in ~[0, 1] (it regresses 1 - distortion strength)."""
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(str(path)))
    cfg = json.loads((path / MINI_IQA_FILES[0]).read_text(encoding="utf-8"))
    model = MiniIQA(channels=tuple(cfg["channels"]), size=cfg["size"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(path / MINI_IQA_FILES[1])).items()})
    return Quality(model.to(device), name or str(path), lower_better=False, score_range=(0.0, 1.0))


def build_mini(device="cpu", seed: int = 0) -> Quality:
    """The quality CNN trained on real Fashion-MNIST that ships in the package; seed unused."""
    from lbgen.models.shipped import shipped_dir

    return load_iqa_dir(shipped_dir("mini", "iqa"), name="mini", device=device)


IQA_BUILDERS: dict[str, Callable[..., Quality]] = {"tiny": build_tiny, "mini": build_mini}


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
    if is_iqa_dir(name):
        return load_iqa_dir(name, device=device)
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
    score_range = parse_score_range(cfg.get("score_range"))
    if name in SCORERS:
        metric, score_range = SCORERS[name](metric)
    return Quality(metric, name, cfg.get("lower_better", False), score_range)
