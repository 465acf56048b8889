"""The fine-tuning network: always the backbone's plain timm model (SwinTransformerV2, VisionTransformer),
so timm's layer-decay grouping, feature extraction and export work on it unchanged.

bn_mlp head (the original's): the pretrained pooled head (768 -> 1024) followed by BatchNorm1d -> Linear ->
GELU -> Linear, all inside `head.fc`. linear head: `head.fc` is one Linear on the pooled features.
"""
from __future__ import annotations

import torch
from torch import nn

from ddmim.errors import UserError


def add_bn_mlp_head(net: nn.Module, embed_dim: int, hidden: int, num_classes: int, backbone: str) -> nn.Module:
    """`net` (a plain timm model whose pooled head `head.fc` gives `embed_dim` features) with the bn_mlp
    classifier appended inside `head.fc`."""
    if not hasattr(net.head, "fc"):
        raise UserError(f"head.kind bn_mlp builds on a pooled head of the {backbone} backbone's kind that it "
                        "does not have; use head.kind linear")
    net.head.fc = nn.Sequential(net.head.fc, nn.BatchNorm1d(embed_dim), nn.Linear(embed_dim, hidden),
                                nn.GELU(), nn.Linear(hidden, num_classes))
    return net


def load_encoder_weights(net: nn.Module, state: dict[str, torch.Tensor], head_kind: str) -> int:
    """Loads every pretrained encoder weight; only the new head may stay untrained. Returns tensors loaded."""
    if head_kind == "linear":
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    else:
        state = {(f"head.fc.0.{k[len('head.fc.'):]}" if k.startswith("head.fc.") else k): v for k, v in state.items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    new_head = ("head.",) if head_kind == "linear" else ("head.fc.1.", "head.fc.2.", "head.fc.4.")
    missing = [k for k in missing if not k.startswith(new_head)]
    if missing or unexpected:
        raise UserError(f"the checkpoint's encoder does not fit this backbone: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return len(state)
