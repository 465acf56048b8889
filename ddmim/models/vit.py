"""timm's VisionTransformer as an MAE encoder: it runs on the visible patches only.

MAE's speed comes from that: with 75% of the patches masked the blocks see a quarter of the sequence
(plus the class token). The position embedding is MAE's fixed 2-D sine-cosine one, added before the
masked patches are dropped.
"""
from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def sincos_with_class_slot(grid: int, dim: int) -> torch.Tensor:
    """(1, 1 + grid^2, dim): a zero slot for the class token, then the 2-D sine-cosine table."""
    table = build_sincos2d_pos_embed([grid, grid], dim)
    return torch.cat([torch.zeros(1, dim), table]).unsqueeze(0)


class MaskedViT(nn.Module):
    """`net` is the plain timm VisionTransformer (what export and fine-tuning use). A ViT is one stage:
    `depths` and `num_heads` have one entry each."""

    timm_name = "vit_small_patch16_224"  # a registered ViT; the keyword arguments set every shape

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depths, num_heads, mlp_ratio: float,
                 drop_path_rate: float, head_dim: int):
        super().__init__()
        self.timm_kwargs = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim,
                            "depth": sum(depths), "num_heads": num_heads[0], "mlp_ratio": mlp_ratio}
        self.net = VisionTransformer(**self.timm_kwargs, drop_path_rate=drop_path_rate, num_classes=head_dim)
        self.grid, self.patch_size, self.embed_dim = img_size // patch_size, patch_size, embed_dim
        self.net.pos_embed.data.copy_(sincos_with_class_slot(self.grid, embed_dim))
        self.net.pos_embed.requires_grad_(False)  # fixed, as in MAE's pretraining

    def forward_visible(self, images: torch.Tensor, visible: torch.Tensor,
                        count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded class token + visible patches (B, 1 + V, C), indices of the visible patches (B, V)).
        `visible`: (B, grid, grid), 1 = visible, `count` of them in every image. The indices come from a stable
        sort (visible first, in patch order): unlike `nonzero`, the shapes are known without reading the mask on
        the host, so the step neither waits for the device nor breaks a compiled graph."""
        x = self.net.patch_embed(images) + self.net.pos_embed[:, 1:]
        hidden = 1 - visible.flatten(1).to(torch.int8)
        ids = torch.argsort(hidden, dim=1, stable=True)[:, :count]
        x = x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.net.cls_token + self.net.pos_embed[:, :1]).expand(len(images), -1, -1)
        x = self.net.blocks(torch.cat([cls, x], dim=1))
        return self.net.norm(x), ids
