"""The values of a run config that the data modules read: the data section, the image size, the per-device
batch and the seed. `make_datamodule` builds it from a pretraining or a fine-tuning config alike."""
from __future__ import annotations

from dataclasses import dataclass

from ddmim.config import DataConfig


@dataclass(frozen=True)
class LoaderSpec:
    data: DataConfig
    img_size: int
    batch_size: int  # per device
    seed: int

    @classmethod
    def of(cls, cfg) -> LoaderSpec:
        """From a run config (`ddmim.config.RunConfig`, plus the `model.img_size` both kinds have)."""
        return cls(cfg.data, cfg.model.img_size, cfg.train.batch_size, cfg.train.seed)
