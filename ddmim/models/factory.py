"""The only model code that reads a run config: the backbone and method tables, and the builders from a config.

A backbone is a class whose keyword arguments are `model.*` keys (it receives only the ones its signature
names) and that satisfies `contracts.StageBackbone` or `contracts.VisibleBackbone`. A method is an nn.Module
satisfying `contracts.PretrainingMethod`, entered with `build(cfg, encoder, kernels)`, which turns the run
config into the module's plain arguments, and `check(cfg)`, which refuses the configs it cannot run.
Adding either is one file plus one `register_backbone` / `register_method` call (or an entry below).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from torch import nn

from ddmim.config import Config, ModelConfig
from ddmim.config_engine import at_least
from ddmim.errors import UserError
from ddmim.models.classifier import add_bn_mlp_head
from ddmim.models.ddmim import DDMIM, DDMIMLoss
from ddmim.models.kernels import KernelOps
from ddmim.models.mae import MAE
from ddmim.models.masking import MaskSpec
from ddmim.models.swin import MaskedSwin
from ddmim.models.vit import MaskedViT

Build = Callable[[Config, nn.Module, "KernelOps | None"], nn.Module]
Check = Callable[[Config], None]


@dataclasses.dataclass(frozen=True)
class Method:
    build: Build
    check: Check


def mask_spec(cfg: Config) -> MaskSpec:
    return MaskSpec(tuple(cfg.mask.ratios), cfg.mask.exact_count, cfg.mask.patch)


def _build_ddmim(cfg: Config, encoder: nn.Module, kernels: KernelOps | None) -> nn.Module:
    d = cfg.ddmim
    return DDMIM(encoder, mask=mask_spec(cfg), loss=ddmim_loss(cfg), proj_hidden=d.proj_hidden, proj_out=d.proj_out,
                 head_dim=cfg.model.head_dim, mask_token=d.mask_token, teacher_mode=cfg.ema.teacher_mode,
                 kernels=kernels)


def ddmim_loss(cfg: Config) -> DDMIMLoss:
    """The loss's fields, by name, from the ddmim section."""
    values = {f.name: getattr(cfg.ddmim, f.name) for f in dataclasses.fields(DDMIMLoss)}
    return DDMIMLoss(**{**values, "perceptual_weights": tuple(values["perceptual_weights"])})


def _check_ddmim(cfg: Config) -> None:
    if not hasattr(BACKBONES[cfg.model.backbone], "forward_features"):
        raise UserError(f"model.method ddmim masks stages, which the {cfg.model.backbone} backbone does not have")
    if cfg.model.head_dim < 1:
        raise UserError("model.head_dim must be at least 1: DDMIM's projection head reads the pooled head")
    n, weights = len(cfg.model.depths), cfg.ddmim.perceptual_weights
    if len(weights) != n:
        raise UserError(f"ddmim.perceptual_weights needs {n} values (one per stage), got {weights}")
    for name in ("proj_hidden", "proj_out"):
        at_least(f"ddmim.{name}", getattr(cfg.ddmim, name), 1)
    if cfg.ddmim.tau <= 0:
        raise UserError(f"ddmim.tau must be positive, got {cfg.ddmim.tau}")
    if ddmim_loss(cfg).uses_teacher and cfg.train.batch_size < 2:
        raise UserError("train.batch_size must be at least 2 (the contrastive loss needs negatives)")


def _build_mae(cfg: Config, encoder: nn.Module, kernels: KernelOps | None) -> nn.Module:
    m = cfg.mae
    return MAE(encoder, mask=mask_spec(cfg), decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
               decoder_heads=m.decoder_heads, norm_pix=m.norm_pix, kernels=kernels)


def _check_mae(cfg: Config) -> None:
    if not hasattr(BACKBONES[cfg.model.backbone], "forward_visible"):
        raise UserError(f"model.method mae needs a backbone that encodes visible patches only (vit), got "
                        f"'{cfg.model.backbone}'")
    m = cfg.mae
    if min(m.decoder_dim, m.decoder_depth, m.decoder_heads) < 1 or m.decoder_dim % m.decoder_heads:
        raise UserError(f"mae.decoder_dim, mae.decoder_depth and mae.decoder_heads must be at least 1 and the width "
                        f"divisible by the heads, got {m.decoder_dim}, {m.decoder_depth} and {m.decoder_heads}")
    if not cfg.mask.exact_count:
        raise UserError("model.method mae needs mask.exact_count true: every image keeps the same number of "
                        "visible patches")


BACKBONES: dict[str, type[nn.Module]] = {"swin_v2": MaskedSwin, "vit": MaskedViT}
METHODS: dict[str, Method] = {"ddmim": Method(_build_ddmim, _check_ddmim), "mae": Method(_build_mae, _check_mae)}


def register_backbone(name: str, cls: type[nn.Module]) -> None:
    BACKBONES[name] = cls


def register_method(name: str, build: Build, check: Check = lambda cfg: None) -> None:
    METHODS[name] = Method(build, check)


def _lookup(table: dict, key: str, what: str):
    if key not in table:
        raise UserError(f"unknown {what} '{key}'; available: {', '.join(sorted(table))}")
    return table[key]


def check_pretraining(cfg: Config) -> None:
    """The checks of the config's method and backbone (the generic ones ran when the config was built)."""
    _lookup(BACKBONES, cfg.model.backbone, "backbone")
    _lookup(METHODS, cfg.model.method, "method").check(cfg)


def backbone_kwargs(model: ModelConfig, **changes) -> dict:
    """The `model.*` values (with `changes`) that the backbone's class takes; the other keys are not its."""
    accepted = inspect.signature(_lookup(BACKBONES, model.backbone, "backbone")).parameters
    values = {**dataclasses.asdict(model), **changes}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return values
    return {key: value for key, value in values.items() if key in accepted}


def create_backbone(model: ModelConfig, **changes) -> nn.Module:
    return BACKBONES[model.backbone](**backbone_kwargs(model, **changes))


def pretraining_model(cfg: Config, kernels: KernelOps | None = None) -> nn.Module:
    """The model `model.method` names, on the backbone `model.backbone` names, once the method has checked the
    config (every command builds through here, `--benchmark` and evaluation included)."""
    check_pretraining(cfg)
    return METHODS[cfg.model.method].build(cfg, create_backbone(cfg.model), kernels)


def plain_backbone(model: ModelConfig, **changes) -> nn.Module:
    """The plain timm model of a config's backbone; `changes` override `model.*` values (head_dim=0: no head;
    drop_path_rate for fine-tuning)."""
    return create_backbone(model, **changes).net


def headless_export(model: ModelConfig) -> tuple[nn.Module, str, dict]:
    """(the plain timm model without head, and the name and keyword arguments of the `timm.create_model`
    call that builds the same model), from one construction."""
    encoder = create_backbone(model, head_dim=0)
    return encoder.net, encoder.timm_name, {"pretrained": False, "num_classes": 0, **encoder.timm_kwargs}


def classifier(model: ModelConfig, num_classes: int, head_kind: str, hidden: int, drop_path: float) -> nn.Module:
    """The fine-tuning network: the backbone's plain timm model with a `linear` or `bn_mlp` head."""
    if head_kind == "linear":
        return plain_backbone(model, drop_path_rate=drop_path, head_dim=num_classes)
    return add_bn_mlp_head(plain_backbone(model, drop_path_rate=drop_path), model.head_dim, hidden, num_classes,
                           model.backbone)
