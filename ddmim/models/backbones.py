"""The one place backbones plug in: `create_backbone(name, **architecture)`.

A backbone for the masked pretraining methods (DDMIM, SimMIM) is an nn.Module with
- `grid` (tokens per side of the base mask), `stride` (pixels per last-stage token), `num_features`
  (width of the last stage), `embed_dim` (width of the patch tokens, the mask token's size);
- `stages`: the modules the EMA teacher copies;
- `forward_features(images, masks, mask_token=None, stages=None)`: every stage's tapped output, the
  stage masks applied (`stages` runs another copy, the teacher's, on this backbone's patch embedding);
- `forward_head(last, pre_logits=False)` and `normed(last)`: the pooled embedding and the final norm;
- `net`, `timm_name`, `timm_kwargs`: the plain timm model, and the `timm.create_model` call that builds it
  (export and fine-tuning use these).
An MAE backbone (`vit`) provides `forward_visible(images, visible)`, `grid`, `patch_size` and `embed_dim`
instead of the stage interface.
Adding a backbone is one `register_backbone` entry; `model.backbone` selects it.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ddmim.errors import UserError
from ddmim.models.swin import MaskedSwin
from ddmim.models.vit import MaskedViT

BACKBONES: dict[str, Callable[..., nn.Module]] = {"swin_v2": MaskedSwin, "vit": MaskedViT}


def register_backbone(name: str, factory: Callable[..., nn.Module]) -> None:
    BACKBONES[name] = factory


def create_backbone(name: str, **architecture) -> nn.Module:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}'; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](**architecture)


def pretraining_model(cfg, kernels=None) -> nn.Module:
    """The model `model.method` names, built from a pretraining run config."""
    from ddmim.models.ddmim import DDMIM
    from ddmim.models.mae import MAE

    return (MAE if cfg.model.method == "mae" else DDMIM).from_config(cfg, kernels=kernels)


def architecture(model) -> dict:
    """The keyword arguments of a ModelConfig that shape a backbone."""
    return {"img_size": model.img_size, "patch_size": model.patch_size, "embed_dim": model.embed_dim,
            "depths": list(model.depths), "num_heads": list(model.num_heads), "window_size": model.window_size,
            "mlp_ratio": model.mlp_ratio, "drop_path_rate": model.drop_path_rate, "head_dim": model.head_dim,
            "perceptual_tap": model.perceptual_tap, "fused_attention": model.fused_attention}


def plain_backbone(model, **changes) -> nn.Module:
    """The plain timm model of a ModelConfig's backbone; `changes` override architecture entries
    (head_dim=0: no head; drop_path_rate for fine-tuning)."""
    return create_backbone(model.backbone, **{**architecture(model), **changes}).net


def headless_export(model) -> tuple[nn.Module, str, dict]:
    """(the plain timm model without head, and the name and keyword arguments of the `timm.create_model`
    call that builds the same model), from one construction."""
    encoder = create_backbone(model.backbone, **{**architecture(model), "head_dim": 0})
    return encoder.net, encoder.timm_name, {"pretrained": False, "num_classes": 0, **encoder.timm_kwargs}
