"""Typed fine-tuning configuration; presets live in ddmim/presets/finetune/."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ddmim.config import MOVED_KEYS, DataConfig, ModelConfig, OptimConfig, TrainConfig
from ddmim.config_engine import build_dataclass, check_sections, moved_keys, preset_values
from ddmim.errors import UserError


@dataclass
class HeadConfig:
    # bn_mlp: BatchNorm + 2-layer MLP on the head_dim embedding (the original's); linear: one layer on the pooled
    # features
    kind: Literal["bn_mlp", "linear"] = "bn_mlp"
    hidden: int = 1024


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Pretraining's optimiser section with fine-tuning's defaults, plus layer-wise lr decay."""
    step_size: int = 30
    min_lr: float = 1e-6
    layer_decay: float = 1.0  # lr multiplier per layer from the head down (1.0: none)

    def check(self) -> None:
        super().check()
        if not 0 < self.layer_decay <= 1:
            raise UserError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class AugmentConfig:
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    label_smoothing: float = 0.0
    randaugment: str = ""  # timm policy string, e.g. rand-m9-mstd0.5-inc1 ("" off)
    drop_path: float = 0.0

    def check(self) -> None:
        if min(self.mixup, self.cutmix, self.drop_path) < 0 or not 0 <= self.label_smoothing < 1 \
                or self.drop_path >= 1:
            raise UserError("augment.mixup and augment.cutmix must not be negative, augment.label_smoothing and "
                            "augment.drop_path must be in [0, 1)")


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
    check_sections(cfg)
    return cfg


def make_finetune_config(preset: str, overrides: list[str] | None = None,
                         typed: dict[str, Any] | None = None) -> FinetuneConfig:
    return finetune_config_from_dict(preset_values(preset, overrides, kind="finetune", typed=typed))
