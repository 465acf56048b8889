"""The seed's augmentation as torchvision transforms; the fast loaders reproduce these parameters."""
from __future__ import annotations

from torchvision import transforms as T

from ddmim.config import DataConfig


def interpolation(cfg: DataConfig) -> T.InterpolationMode:
    return T.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else T.InterpolationMode.BILINEAR


def train_transform(size: int, cfg: DataConfig, randaugment: str = "") -> T.Compose:
    """randaugment: a timm policy string (e.g. rand-m9-mstd0.5-inc1) applied to the PIL crop; "" for none."""
    extra = []
    if randaugment:
        from timm.data.auto_augment import rand_augment_transform

        mean = tuple(round(255 * m) for m in cfg.mean)
        extra = [rand_augment_transform(randaugment, {"translate_const": int(size * 0.45), "img_mean": mean})]
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                            interpolation=interpolation(cfg)),
        T.RandomHorizontalFlip(cfg.hflip),
        *extra,
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def val_transform(size: int, cfg: DataConfig) -> T.Compose:
    return T.Compose([
        T.Resize(round(size / cfg.val_crop_ratio), interpolation=interpolation(cfg)),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])
