"""timm's SwinTransformerV2 driven stage by stage, so each stage's input can be masked and its output tapped.

In timm's V2 layout a stage is `downsample` (patch merging; identity in stage 0) followed by `blocks`.
The mask multiplies the tokens after the merging, i.e. exactly the tokens entering the stage's
transformer blocks; with a mask token (SimMIM) the masked tokens entering stage 0 are replaced by it.

Where the perceptual loss reads each stage (`model.perceptual_tap`):
- `after_next_merge` (the original DDMIM): its Swin layer is (blocks, then patch merging), so the output
  of stages 0-2 is read after the next stage's merging (Swin-T: grids 28/14/7, widths 192/384/768), and
  the merging layers get a perceptual gradient;
- `stage_output`: after each stage's blocks, before the next merging (grids 56/28/14/7).
The last stage has no merging after it, so both read its blocks' output.
"""
from __future__ import annotations

import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from ddmim.config import ModelConfig

TAPS = ("after_next_merge", "stage_output")


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


def stage_taps(stages: nn.Sequential, tokens: torch.Tensor, masks: list[torch.Tensor | None], tap: str,
               mask_token: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every stage's tapped output for (B, H, W, C) patch tokens; the last one is the final stage's output.
    `masks[i]` (B, H_i, W_i), 1 = visible, multiplies the tokens entering stage i's blocks."""
    taps: list[torch.Tensor] = []
    x = tokens
    for i, (stage, mask) in enumerate(zip(stages, masks)):
        x = stage.downsample(x)
        if i and tap == "after_next_merge":
            taps[-1] = x
        if mask is not None:
            visible = mask.unsqueeze(-1).to(x.dtype)
            x = x * visible if mask_token is None or i else x * visible + mask_token.to(x.dtype) * (1 - visible)
        for block in stage.blocks:
            x = block(x)
        taps.append(x)
    return taps


class MaskedSwin(nn.Module):
    """The student encoder: patch embedding, masked stages, final norm, pooled linear head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swin = build_swin(cfg)
        self.tap = cfg.perceptual_tap
        self.num_stages = len(cfg.depths)
        self.grid = cfg.img_size // cfg.patch_size
        self.stride = cfg.patch_size * 2 ** (self.num_stages - 1)  # pixels per last-stage token
        self.num_features = self.swin.num_features

    @property
    def stages(self) -> nn.Sequential:
        return self.swin.layers

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.swin.patch_embed(images)

    def forward_stages(self, tokens: torch.Tensor, masks: list[torch.Tensor | None],
                       mask_token: torch.Tensor | None = None) -> list[torch.Tensor]:
        return stage_taps(self.stages, tokens, masks, self.tap, mask_token)

    def norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.swin.norm(tokens)

    def pooled_head(self, normed: torch.Tensor) -> torch.Tensor:
        """Average pool over tokens, then the linear head (768 -> 1024 for Swin-T)."""
        return self.swin.forward_head(normed)
