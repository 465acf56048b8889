import math

import pytest
import torch
import torch.nn.functional as F

from ddmim.models.losses import info_nce, perceptual_losses, reconstruction_loss
from ddmim.models.masking import base_token_mask, pixel_mask


@pytest.mark.parametrize("normalize", ["all", "masked"])
def test_reconstruction_ignores_visible_pixels(normalize):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    mask = base_token_mask(2, 4, 0.5, generator=g)
    visible = pixel_mask(mask, 4).expand_as(pred).bool()
    loss = reconstruction_loss(pred, target, mask, normalize=normalize)
    changed_visible = torch.where(visible, pred + 5.0, pred)
    assert reconstruction_loss(changed_visible, target, mask, normalize=normalize) == loss
    changed_masked = torch.where(visible, pred, pred + 5.0)
    assert reconstruction_loss(changed_masked, target, mask, normalize=normalize) > loss


def test_reconstruction_hand_computed():
    target = torch.zeros(1, 1, 4, 4)
    pred = torch.full((1, 1, 4, 4), 9.0)  # visible pixels: large errors that must not count
    pred[0, 0, :2, :2] = torch.tensor([[0.5, 2.0], [0.0, -1.0]])  # the one masked token
    mask = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    # smooth-L1 (beta 1): 0.5 -> 0.125, 2 -> 1.5, 0 -> 0, -1 -> 0.5; sum 2.125
    assert reconstruction_loss(pred, target, mask, normalize="all").item() == pytest.approx(2.125 / 16)
    assert reconstruction_loss(pred, target, mask, normalize="masked").item() == pytest.approx(2.125 / 4)


def test_reconstruction_equals_seed_formula():
    g = torch.Generator().manual_seed(1)
    pred, x = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    mask = base_token_mask(3, 8, 0.5, generator=g)
    m = pixel_mask(mask, 4)
    seed = F.smooth_l1_loss(pred * (1 - m), x * (1 - m))
    torch.testing.assert_close(reconstruction_loss(pred, x, mask, normalize="all"), seed)


def _direct_info_nce(z_s, z_t, tau, offset, quirk):
    total = 0.0
    for i in range(z_s.shape[0]):
        sims = [F.cosine_similarity(z_s[i], z_t[j], dim=0).item() / tau for j in range(z_t.shape[0])]
        pos = sims[offset + i]
        others = [s for j, s in enumerate(sims) if j != offset + i]
        denom = math.exp(pos) + sum(math.exp(s) for s in others) + (1.0 if quirk else 0.0)
        total += -math.log(math.exp(pos) / denom)
    return total / z_s.shape[0]


@pytest.mark.parametrize("quirk", [False, True])
@pytest.mark.parametrize("offset", [0, 5])
def test_info_nce_matches_direct_computation(quirk, offset):
    g = torch.Generator().manual_seed(2)
    z_s = torch.randn(5, 16, generator=g, dtype=torch.float64)
    z_t = torch.randn(10, 16, generator=g, dtype=torch.float64)
    got = info_nce(z_s, z_t, tau=0.5, offset=offset, extra_logit=quirk).item()
    assert got == pytest.approx(_direct_info_nce(z_s, z_t, 0.5, offset, quirk), rel=1e-5)


def test_info_nce_teacher_is_stop_gradient():
    z_s = torch.randn(4, 8, requires_grad=True)
    z_t = torch.randn(4, 8, requires_grad=True)
    info_nce(z_s, z_t, tau=0.05).backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert z_t.grad is None


def test_perceptual_one_term_per_stage():
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(2, 8 // 2**i, 8 // 2**i, 4 * 2**i, generator=g) for i in range(4)]
    teacher = [torch.randn_like(s) for s in student]
    terms = perceptual_losses(student, teacher)
    assert len(terms) == 4
    for s, t, term in zip(student, teacher, terms):
        torch.testing.assert_close(term, F.smooth_l1_loss(s, t))
