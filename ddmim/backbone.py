"""timm's SwinTransformerV2 driven stage by stage, so each stage's input can be masked and its output tapped.

In timm's V2 layout a stage is `downsample` (patch merging; identity in stage 0) followed by `blocks`.
The mask multiplies the tokens after the merging, i.e. exactly the tokens entering the stage's
transformer blocks. The perceptual tap is the stage output after its blocks, before the next stage's
patch merging; the same point for every stage (grids 56/28/14/7 at 224 px for Swin-T).
"""
from __future__ import annotations

import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from ddmim.config import ModelConfig


def build_swin(cfg: ModelConfig) -> SwinTransformerV2:
    return SwinTransformerV2(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depths=tuple(cfg.depths),
        num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        drop_path_rate=cfg.drop_path_rate,
        num_classes=cfg.embed_out,
    )


def run_stage(stage: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One timm V2 stage on (B, H, W, C) tokens; `mask` (B, H', W') zeroes masked tokens after merging."""
    x = stage.downsample(x)
    if mask is not None:
        x = x * mask.unsqueeze(-1).to(x.dtype)
    for block in stage.blocks:
        x = block(x)
    return x


class MaskedSwin(nn.Module):
    """The student encoder: patch embedding, masked stages, final norm, pooled linear head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swin = build_swin(cfg)
        self.num_stages = len(cfg.depths)
        self.grid = cfg.img_size // cfg.patch_size
        self.stride = cfg.patch_size * 2 ** (self.num_stages - 1)  # pixels per last-stage token
        self.num_features = self.swin.num_features

    @property
    def stages(self) -> nn.Sequential:
        return self.swin.layers

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.swin.patch_embed(images)

    def forward_stages(self, tokens: torch.Tensor, masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
        outputs = []
        for stage, mask in zip(self.stages, masks):
            tokens = run_stage(stage, tokens, mask)
            outputs.append(tokens)
        return outputs

    def norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.swin.norm(tokens)

    def pooled_head(self, normed: torch.Tensor) -> torch.Tensor:
        """Average pool over tokens, then the linear head (768 -> 1024 for Swin-T)."""
        return self.swin.forward_head(normed)
