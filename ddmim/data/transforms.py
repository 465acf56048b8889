"""The seed's augmentation as torchvision transforms; the fast loaders reproduce these parameters."""
from __future__ import annotations

from torchvision import transforms as T

from ddmim.config import DataConfig


def train_transform(size: int, cfg: DataConfig) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(cfg.hflip),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def val_transform(size: int, cfg: DataConfig) -> T.Compose:
    return T.Compose([
        T.Resize(round(size / cfg.val_crop_ratio), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])
