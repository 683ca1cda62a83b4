"""lbGen's losses (DESIGN 1.4-1.7) as plain PyTorch modules.

- L_in: each image against its own prompt (the diagonal), not the B x B matrix.
- L_en: a discriminator D tells CLIP text features of classes drawn from the
  WHOLE table ("real") from CLIP features of generated images ("fake").
- L_q: 1 - the IQA score mapped to [0, 1].
Every loss returns a dict of named parts plus `loss`, so every part is logged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def individual_alignment_loss(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """mean_i (1 - cos(image_i, text_i)) for (B, D) unit-norm features paired row by row."""
    return (1.0 - (image_features * text_features).sum(dim=-1)).mean()


class Discriminator(nn.Module):
    """Linear(d, h) -> LeakyReLU(0.2) -> Linear(h, 1) on CLIP embeddings; returns (B,) logits."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(-1)


def draw_real_classes(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None, exclude_own: bool = False
) -> torch.Tensor:
    """(B,) class indices drawn uniformly from the whole table, optionally never the image's own."""
    if not exclude_own or num_classes < 2:
        return torch.randint(num_classes, labels.shape, generator=generator)
    # Uniform over the other C - 1 classes: shift a draw from [1, C) past the own label.
    offset = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels.cpu() + offset) % num_classes


def _accuracy(logits: torch.Tensor, target: float) -> torch.Tensor:
    return ((logits > 0).float() == target).float().mean()


def discriminator_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE(D(real), 1) + BCE(D(fake), 0), with fake detached; one D forward on both (DDP-friendly)."""
    logits = disc(torch.cat([real, fake.detach()]))
    real_logits, fake_logits = logits[: len(real)], logits[len(real) :]
    loss = F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return {
        "loss": loss,
        "d_acc_real": _accuracy(real_logits.detach(), 1.0),
        "d_acc_fake": _accuracy(fake_logits.detach(), 0.0),
    }


def adversarial_loss(disc: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss BCE(D(fake), 1)."""
    logits = disc(fake)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


class LbGenLoss(nn.Module):
    """L = w_en * L_en + w_in * L_in + lambda_q * L_q on a batch of generated images.

    Args:
        clip: frozen `lbgen.models.Clip`.
        quality: frozen `lbgen.models.Quality` (score01, higher is better).
        text_features: (C, D) unit-norm CLIP text features of the whole class table.
    """

    def __init__(self, clip, quality, text_features: torch.Tensor, *, w_en: float, w_in: float, lambda_q: float):
        super().__init__()
        self.clip = clip
        self.quality = quality
        self.register_buffer("text_features", text_features, persistent=False)
        self.w_en, self.w_in, self.lambda_q = w_en, w_in, lambda_q

    def forward(self, images: torch.Tensor, labels: torch.Tensor, disc: nn.Module) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1]; labels (B,) rows of the class table."""
        image_features = self.clip.encode_image(images)
        loss_in = individual_alignment_loss(image_features, self.text_features[labels])
        loss_en = adversarial_loss(disc, image_features)
        iqa_score = self.quality(images).mean()
        loss_q = 1.0 - iqa_score
        loss = self.w_en * loss_en + self.w_in * loss_in + self.lambda_q * loss_q
        return {
            "loss": loss,
            "loss_en": loss_en,
            "loss_in": loss_in,
            "loss_q": loss_q,
            "clip_cos": 1.0 - loss_in.detach(),
            "iqa_score": iqa_score.detach(),
            "image_features": image_features,
        }
