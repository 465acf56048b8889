"""Token masks of DDMIM: 1 = visible, 0 = masked (the seed's convention).

Reference implementations; `kernels/` provides fused versions with the same signatures.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskSpec:
    """How a method masks: `ratios[0]` is the base token ratio and stage i > 0 is masked iff ratios[i] > 0;
    `exact_count`: exactly round(ratio * units) masked per image; `patch`: the unit, in tokens per side."""
    ratios: tuple[float, ...]
    exact_count: bool = False
    patch: int = 1


def base_token_mask(batch: int, grid: int, ratio: float, *, exact_count: bool = False, device=None,
                    generator=None) -> torch.Tensor:
    """(B, grid, grid) float mask. Each token is masked independently with probability `ratio` (the
    seed's way), or with `exact_count` exactly round(ratio * grid^2) tokens of each image (SimMIM's)."""
    u = torch.rand(batch, grid, grid, device=device, generator=generator)
    if not exact_count:
        return (u >= ratio).float()
    chosen = u.flatten(1).argsort(dim=1)[:, : round(ratio * grid * grid)]
    mask = torch.ones(batch, grid * grid, device=u.device)
    return mask.scatter_(1, chosen, 0.0).view(batch, grid, grid)


def stage_masks(base: torch.Tensor, ratios: list[float]) -> list[torch.Tensor | None]:
    """One mask per stage: stage i samples the top-left token of each 2^i x 2^i block of the base mask
    (the seed's strided downsampling, not pooling). A stage whose ratio is 0 is not masked (None)."""
    return [base[:, :: 2**i, :: 2**i] if r > 0 else None for i, r in enumerate(ratios)]


def pixel_mask(base: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 1, H, W) mask at pixel resolution: nearest upsampling of the token mask by `patch`."""
    return base.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2).unsqueeze(1)
