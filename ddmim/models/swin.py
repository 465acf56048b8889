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

from ddmim.models.window_attention import use_fused_attention


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
    """timm's SwinTransformerV2 as a masked encoder (`ddmim.models.contracts.StageBackbone`).

    `net` is the plain timm model (what export and fine-tuning use); `stages` its stages, which the EMA
    teacher copies; `forward_features` runs the masked stages and returns every stage's tap; `forward_head`
    is timm's final norm, average pool and linear head (768 -> 1024 for Swin-T)."""

    timm_name = "swinv2_tiny_window8_256"  # a registered Swin V2; the keyword arguments set every shape

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depths, num_heads, window_size: int,
                 mlp_ratio: float, drop_path_rate: float, head_dim: int, perceptual_tap: str,
                 fused_attention: bool = True):
        super().__init__()
        self.timm_kwargs = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim,
                            "depths": tuple(depths), "num_heads": tuple(num_heads), "window_size": window_size,
                            "mlp_ratio": mlp_ratio}
        self.net = SwinTransformerV2(**self.timm_kwargs, drop_path_rate=drop_path_rate, num_classes=head_dim)
        if fused_attention:
            use_fused_attention(self.net)
        self.tap = perceptual_tap
        self.grid = img_size // patch_size  # tokens per side of the base mask
        self.stride = patch_size * 2 ** (len(depths) - 1)  # pixels per last-stage token
        self.num_features = self.net.num_features
        self.embed_dim = embed_dim

    @property
    def stages(self) -> nn.Sequential:
        return self.net.layers

    def forward_features(self, images: torch.Tensor, masks: list[torch.Tensor | None] | None = None,
                         mask_token: torch.Tensor | None = None,
                         stages: nn.Module | None = None) -> list[torch.Tensor]:
        """The tapped output of every stage (the last is the final stage's). `stages`: another copy of the
        stages to run (the teacher's) on this encoder's patch embedding."""
        stages = self.stages if stages is None else stages
        masks = masks if masks is not None else [None] * len(stages)
        return stage_taps(stages, self.net.patch_embed(images), masks, self.tap, mask_token)

    def forward_head(self, last: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(self.net.norm(last), pre_logits=pre_logits)

    def normed(self, last: torch.Tensor) -> torch.Tensor:
        """The final norm of the last stage's tokens (the pixel decoder's input)."""
        return self.net.norm(last)
