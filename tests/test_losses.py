import math

import pytest
import torch
import torch.nn.functional as F

from lbgen.method.losses import (
    Discriminator,
    adversarial_loss,
    discriminator_loss,
    draw_real_classes,
    individual_alignment_loss,
)


def test_individual_alignment_is_the_diagonal():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1)
    # cos on the diagonal: 1, 1, 1/sqrt(2); the full 3x3 mean (the authors' bug) differs.
    expected = ((1 - 1) + (1 - 1) + (1 - 1 / math.sqrt(2))) / 3
    assert individual_alignment_loss(image, text).item() == pytest.approx(expected)
    full_matrix = (1 - image @ text.T).mean().item()
    assert full_matrix != pytest.approx(expected)


def test_real_classes_come_from_the_whole_table():
    labels = torch.arange(4)  # the first B classes
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([draw_real_classes(labels, 1000, gen) for _ in range(500)])
    assert drawn.max() > 900 and len(drawn.unique()) > 800


def test_exclude_own_class_never_draws_it_and_stays_uniform():
    labels = torch.tensor([0, 3, 9] * 1000)
    drawn = draw_real_classes(labels, 10, torch.Generator().manual_seed(0), exclude_own=True)
    assert not (drawn == labels).any()
    counts = torch.bincount(drawn[labels == 3], minlength=10)
    assert counts[3] == 0 and counts.min().item() == 0 and (counts[counts > 0] > 70).all()


def test_discriminator_loss_and_accuracies():
    disc = Discriminator(4, 8)
    real, fake = torch.randn(6, 4), torch.randn(6, 4, requires_grad=True)
    parts = discriminator_loss(disc, real, fake)
    parts["loss"].backward()
    assert fake.grad is None  # fake is detached for D's loss
    assert all(p.grad is not None for p in disc.parameters())
    assert 0 <= parts["d_acc_real"] <= 1 and 0 <= parts["d_acc_fake"] <= 1


def test_adversarial_loss_is_non_saturating():
    disc = Discriminator(4, 8)
    fake = torch.randn(5, 4, requires_grad=True)
    loss = adversarial_loss(disc, fake)
    expected = F.binary_cross_entropy_with_logits(disc(fake), torch.ones(5))
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert fake.grad.abs().sum() > 0
