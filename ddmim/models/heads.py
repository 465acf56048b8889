"""The projection head and the SimMIM pixel decoder."""
from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class PixelDecoder(nn.Module):
    """SimMIM decoder: 1x1 conv to stride^2 * 3 channels, then PixelShuffle(stride) back to the image size."""

    def __init__(self, in_dim: int, stride: int, out_chans: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, stride * stride * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)
        # the tokens come channels-last, so the image would too; the loss is cheapest in the images' own layout
        self.memory_format = torch.contiguous_format

    def forward(self, normed_tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) normalised last-stage tokens -> (B, 3, h*stride, w*stride), in `memory_format`."""
        # the 1x1 conv and the pixel shuffle keep their input's layout
        return self.shuffle(self.conv(normed_tokens.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)))
