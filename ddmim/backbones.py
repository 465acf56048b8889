"""The student encoder of a pretraining checkpoint (or a random one) as a plain timm SwinTransformerV2."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2

from ddmim.backbone import build_swin
from ddmim.checkpoints import load_pretraining
from ddmim.config import ModelConfig


def load_backbone(ckpt: Path | None, fallback: ModelConfig, seed: int = 0) -> tuple[SwinTransformerV2, ModelConfig]:
    """Pretrained student encoder with its pooled head (strict load), or a seeded random one of `fallback`'s shape."""
    if ckpt is None:
        torch.manual_seed(seed)
        return build_swin(fallback).eval(), fallback
    cfg, state = load_pretraining(ckpt)
    net = build_swin(cfg.model)
    net.load_state_dict(state, strict=True)
    return net.eval(), cfg.model


def pooled_features(net: SwinTransformerV2, images: torch.Tensor) -> torch.Tensor:
    """Average-pooled final-stage features (768-d for Swin-T), before any head."""
    return net.forward_head(net.forward_features(images), pre_logits=True)


def headless(model: ModelConfig) -> ModelConfig:
    return dataclasses.replace(model, embed_out=0)
