"""`create_clip`: a frozen open_clip model with differentiable preprocessing.

Images enter as float tensors in [0, 1] (B, 3, H, W) straight from the VAE: they
are resized and normalised in torch, with no PIL round trip, so gradients reach
the generator.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lbgen.models.hub import hub_access, is_local_path, not_found

TEXT_CHUNK = 256  # prompts encoded per forward when embedding a whole class table


class Clip(nn.Module):
    """open_clip model + tokenizer; `encode_image`/`encode_text` return unit-norm features."""

    def __init__(self, model: nn.Module, tokenizer: Callable, image_size: int, mean, std, name: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[-1] if hasattr(self.model, "text_projection") else self.model.embed_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised (B, 3, S, S), differentiable."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return F.normalize(self.model.encode_image(self.preprocess(images).to(dtype)).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) unit-norm text features; the text tower is frozen, so no graph."""
        device = self.mean.device
        chunks = [
            self.model.encode_text(self.tokenizer(list(texts[i : i + TEXT_CHUNK])).to(device)).float()
            for i in range(0, len(texts), TEXT_CHUNK)
        ]
        return F.normalize(torch.cat(chunks), dim=-1)


def build_tiny(seed: int = 0) -> Clip:
    """A small seeded random open_clip CLIP (ViT, 2 layers, 64 px, embed 32) with the real tokenizer."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        )
    return Clip(
        model,
        open_clip.get_tokenizer("ViT-B-32"),
        image_size=64,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        name="tiny",
    )


# A local open_clip model: its config (open_clip's hub layout: `model_cfg` = `open_clip.CLIP` keyword
# arguments, `preprocess_cfg` = size, mean, std) and its weights.
MINI_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def is_clip_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), MINI_CLIP_FILES[0]))


def load_clip_dir(path: str | Path, name: str | None = None) -> Clip:
    """A `Clip` from a directory holding MINI_CLIP_FILES (weights read with safetensors, cast to fp32)."""
    import open_clip
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(str(path)))
    if not (path / MINI_CLIP_FILES[1]).is_file():
        raise not_found("CLIP weights file", str(path / MINI_CLIP_FILES[1]), HOW_TO_PROVIDE)
    cfg = json.loads((path / MINI_CLIP_FILES[0]).read_text(encoding="utf-8"))
    model = open_clip.CLIP(**cfg["model_cfg"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(path / MINI_CLIP_FILES[1])).items()})
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["model_cfg"]["text_cfg"]["context_length"])
    pre = cfg["preprocess_cfg"]
    return Clip(model, tokenizer, pre["size"], pre["mean"], pre["std"], name or str(path))


def build_mini(seed: int = 0) -> Clip:
    """The CLIP trained on real Fashion-MNIST that ships in the package (`scripts/train_mini.py`); seed unused."""
    from lbgen.models.shipped import shipped_dir

    return load_clip_dir(shipped_dir("mini", "clip"), name="mini")


CLIP_BUILDERS: dict[str, Callable[..., Clip]] = {"tiny": build_tiny, "mini": build_mini}

HOW_TO_PROVIDE = (
    "Pass an open_clip architecture name (open_clip.list_models()) with --clip-pretrained set to a tag "
    "cached in $HF_HOME, a local weights file, or null for random weights; a directory holding "
    f"{' + '.join(MINI_CLIP_FILES)}; or use --clip mini (trained, shipped) or --clip tiny (random)."
)


def create_clip(
    name: str, pretrained: str | None = None, *, device: str | torch.device = "cpu", seed: int = 0
) -> Clip:
    """A frozen `Clip` from a builder name (`tiny`, `mini`), a local model directory, or an open_clip architecture + weights.

    Args:
        name: key of CLIP_BUILDERS, a directory holding MINI_CLIP_FILES, or an open_clip model name such as "ViT-L-14".
        pretrained: open_clip tag ("openai"), a local weights file, or None for random init.
        device: where the model is placed.
        seed: initialisation seed for random weights.
    Raises:
        ModelNotFoundError: unknown architecture, or weights neither local, cached nor reachable.
    """
    import open_clip

    if name in CLIP_BUILDERS:
        return CLIP_BUILDERS[name](seed=seed).to(device)
    if is_local_path(name) and is_clip_dir(name):
        return load_clip_dir(name).to(device)
    if name not in open_clip.list_models():
        raise not_found("CLIP architecture", name, HOW_TO_PROVIDE)
    if pretrained and is_local_path(pretrained) and not os.path.isfile(os.path.expanduser(pretrained)):
        raise not_found("CLIP weights file", pretrained, HOW_TO_PROVIDE)
    with hub_access(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device=device, weights_only=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise not_found(f"CLIP weights {pretrained!r} for", name, HOW_TO_PROVIDE, err) from None
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return Clip(model, open_clip.get_tokenizer(name), size, cfg["mean"], cfg["std"], name).to(device)
