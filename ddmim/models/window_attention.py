"""SwinV2's window attention through `F.scaled_dot_product_attention`: the same math as timm's, one fused kernel.

timm writes the attention out by hand: cosine similarity of normalised queries and keys, times a per-head
learned scale clamped at 100, plus the continuous position bias `16 * sigmoid(cpb_mlp(table))` and, for shifted
windows, the mask of the windows' borders, then softmax and the product with the values. Here the scale is
folded into the normalised queries (`scale=1`) and the bias plus the mask are the `attn_mask`, so a GPU runs one
fused attention kernel instead of the score matrix's matmul, adds, softmax and matmul. Parameters and buffers are
timm's own: state dicts, export and fine-tuning are unchanged (`model.fused_attention` switches it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import WindowAttention
from torch import nn

MAX_LOGIT_SCALE = math.log(1.0 / 0.01)  # timm's clamp


class FusedWindowAttention(WindowAttention):
    """timm's WindowAttention with the forward above (a module's class is switched to it: `use_fused_attention`)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        windows, tokens, channels = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()  # (heads, 1, 1)
        q = F.normalize(q, dim=-1) * scale
        k = F.normalize(k, dim=-1)
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
        bias = 16 * torch.sigmoid(bias)  # (heads, N, N)
        if mask is not None:  # (windows of one image, N, N): per window of each image, shared by the heads
            # every fused backend takes 4-D q/k/v only: the windows of an image become heads of one sequence
            # batch, (images, windows x heads, N, d), and the mask + bias (1, windows x heads, N, N) broadcasts
            # over the images
            per_image = mask.shape[0]
            q, k, v = (t.reshape(-1, per_image * self.num_heads, tokens, t.shape[-1]) for t in (q, k, v))
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, per_image * self.num_heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.attn_drop.p if self.training else 0.0, scale=1.0)
        out = out.reshape(windows, self.num_heads, tokens, -1).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj_drop(self.proj(out))


def use_fused_attention(model: nn.Module) -> nn.Module:
    """Every timm SwinV2 WindowAttention of `model` computes through scaled_dot_product_attention."""
    for module in model.modules():
        if type(module) is WindowAttention:
            module.__class__ = FusedWindowAttention
    return model
