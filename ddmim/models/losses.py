"""DDMIM's losses as pure functions of tensors (reference implementations).

`kernels/` provides fused versions of `reconstruction_loss` and the perceptual terms with the same
signatures; these stay the ground truth the kernels are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddmim.models.masking import pixel_mask


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    beta: float = 1.0,
    normalize: str = "all",
) -> torch.Tensor:
    """Smooth-L1 between `pred` and `target` (B, C, H, W) on masked pixels only.

    `token_mask` is (B, h, w) with 1 = visible, 0 = masked; one token covers H/h x W/w pixels.
    normalize="all" (seed): sum over masked pixels / (B*C*H*W), i.e. the seed's
    `smooth_l1(pred * (1 - m), x * (1 - m))` with mean reduction.
    normalize="masked" (SimMIM): sum over masked pixels / (number of masked pixels * C).
    """
    patch = pred.shape[-1] // token_mask.shape[-1]
    hidden = 1.0 - pixel_mask(token_mask, patch).to(pred.dtype)
    per_pixel = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta)
    total = (per_pixel * hidden).sum()
    if normalize == "all":
        return total / per_pixel.numel()
    if normalize == "masked":
        return total / (hidden.sum() * pred.shape[1]).clamp_min(1.0)
    raise ValueError(f"normalize must be 'all' or 'masked', got {normalize!r}")


def perceptual_losses(student: list[torch.Tensor], teacher: list[torch.Tensor], *,
                      beta: float = 1.0) -> list[torch.Tensor]:
    """One smooth-L1 (mean) term per stage between student and (detached) teacher stage outputs."""
    return [F.smooth_l1_loss(s.float(), t.detach().float(), beta=beta) for s, t in zip(student, teacher)]


def info_nce(z_s: torch.Tensor, z_t: torch.Tensor, *, tau: float, offset: int = 0,
             extra_logit: bool = False) -> torch.Tensor:
    """InfoNCE of student embeddings (B, D) against teacher embeddings (N, D), N >= B.

    Logits are cosine similarities / tau; the positive of student row i is teacher row offset + i
    (offset = rank * B when the teacher embeddings were gathered from all data-parallel ranks); every
    other teacher row is a negative. The teacher side is a stop-gradient target.
    extra_logit: the seed puts the positive in a column of its own and zeroes the positive's slot among
    the negatives instead of removing it, which adds one constant logit exp(0) to every denominator.
    """
    z_s = F.normalize(z_s.float(), dim=-1)
    z_t = F.normalize(z_t.detach().float(), dim=-1)
    logits = z_s @ z_t.T / tau
    labels = torch.arange(z_s.shape[0], device=z_s.device) + offset
    if extra_logit:
        positive = logits.gather(1, labels[:, None])
        negatives = logits.scatter(1, labels[:, None], 0.0)
        logits = torch.cat([positive, negatives], dim=1)
        labels = torch.zeros_like(labels)
    return F.cross_entropy(logits, labels)


def mean_visible_colour(images: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The trivial reconstruction: every pixel predicted as its image's mean visible colour."""
    visible = pixel_mask(base, images.shape[-1] // base.shape[-1])
    mean = (images * visible).sum(dim=(2, 3), keepdim=True) / visible.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    return mean.expand_as(images)


def against_mean_colour(pred: torch.Tensor, images: torch.Tensor, base: torch.Tensor, *, beta: float,
                        normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reconstruction loss of `pred`, that of predicting each image's mean visible colour)."""
    return (reconstruction_loss(pred, images, base, beta=beta, normalize=normalize),
            reconstruction_loss(mean_visible_colour(images, base), images, base, beta=beta, normalize=normalize))
