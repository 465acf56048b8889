"""The student encoder of a pretraining checkpoint (or a random one) as a plain timm model, and its features."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ddmim.checkpoints import load_pretraining
from ddmim.models.factory import plain_backbone


def load_backbone(ckpt: Path | None, fallback, seed: int = 0) -> tuple[nn.Module, object]:
    """(Pretrained student encoder with its pooled head (strict load), or a seeded random one of `fallback`'s
    shape; the run config it came with, or `fallback` itself)."""
    if ckpt is None:
        torch.manual_seed(seed)
        return plain_backbone(fallback.model).eval(), fallback
    cfg, state = load_pretraining(ckpt)
    net = plain_backbone(cfg.model)
    net.load_state_dict(state, strict=True)
    return net.eval(), cfg

