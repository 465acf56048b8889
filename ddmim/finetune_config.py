"""Typed fine-tuning configuration; presets live in ddmim/presets/finetune/."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ddmim.config import (
    MOVED_KEYS,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    build_dataclass,
    moved_keys,
    preset_values,
    validate_data_and_train,
    validate_model,
    validate_optim,
)
from ddmim.errors import UserError


@dataclass
class HeadConfig:
    kind: str = "bn_mlp"  # bn_mlp: BatchNorm + 2-layer MLP on the head_dim embedding (the original's); linear: one
    # layer on the pooled features
    hidden: int = 1024


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Pretraining's optimiser section with fine-tuning's defaults, plus layer-wise lr decay."""
    step_size: int = 30
    min_lr: float = 1e-6
    layer_decay: float = 1.0  # lr multiplier per layer from the head down (1.0: none)


@dataclass
class AugmentConfig:
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    label_smoothing: float = 0.0
    randaugment: str = ""  # timm policy string, e.g. rand-m9-mstd0.5-inc1 ("" off)
    drop_path: float = 0.0


@dataclass
class FinetuneConfig:
    kind: ClassVar[str] = "finetune"  # the kind of checkpoint a run of this config writes
    name: str = "seed"
    model: ModelConfig = field(default_factory=ModelConfig)  # the backbone when no checkpoint gives one
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def upgrade(values: dict[str, Any]) -> dict[str, Any]:
        """Values written by an earlier ddmim: the pretraining methods' keys its model section once carried go."""
        return moved_keys(values, {(section, key): None for (section, key) in MOVED_KEYS if section == "model"})


def finetune_config_from_dict(values: dict[str, Any]) -> FinetuneConfig:
    cfg = build_dataclass(FinetuneConfig, FinetuneConfig.upgrade(values))
    validate_model(cfg.model)
    validate_data_and_train(cfg.data, cfg.train)
    if cfg.head.kind not in ("bn_mlp", "linear"):
        raise UserError(f"head.kind must be bn_mlp or linear, got '{cfg.head.kind}'")
    validate_optim(cfg.optim)
    if not 0 < cfg.optim.layer_decay <= 1:
        raise UserError(f"optim.layer_decay must be in (0, 1], got {cfg.optim.layer_decay}")
    if cfg.train.batch_size < 1:
        raise UserError("train.batch_size must be at least 1")
    a = cfg.augment
    if min(a.mixup, a.cutmix, a.drop_path) < 0 or not 0 <= a.label_smoothing < 1 or a.drop_path >= 1:
        raise UserError("augment.mixup and augment.cutmix must not be negative, augment.label_smoothing and "
                        "augment.drop_path must be in [0, 1)")
    return cfg


def make_finetune_config(preset: str, overrides: list[str] | None = None,
                         typed: dict[str, Any] | None = None) -> FinetuneConfig:
    return finetune_config_from_dict(preset_values(preset, overrides, kind="finetune", typed=typed))
