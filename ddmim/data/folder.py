"""ImageFolder-layout data (ROOT/train/<class>/*, ROOT/val/<class>/*) read with torchvision."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from ddmim.data.transforms import train_transform, val_transform
from ddmim.errors import UserError


def open_split(root: Path, split: str, transform) -> ImageFolder:
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"data path {root} has no '{split}/' folder (expected {root}/{split}/<class>/<image>)")
    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"no images found in {folder}: {exc}") from None


class FolderDataModule(pl.LightningDataModule):
    applies_randaugment = True  # in the PIL pipeline, per image

    def __init__(self, root: Path, cfg, randaugment: str = ""):
        """`cfg`: a pretraining or fine-tuning config (uses .model.img_size, .data, .train)."""
        super().__init__()
        self.root = Path(root)
        self.cfg = cfg
        if not self.root.is_dir():
            raise UserError(f"data path {self.root} does not exist or is not a folder")
        size = cfg.model.img_size
        self.train_set = open_split(self.root, "train", train_transform(size, cfg.data, randaugment))
        self.num_classes = len(self.train_set.classes)
        self.val_set = open_split(self.root, "val", val_transform(size, cfg.data))
        if len(self.train_set) < cfg.train.batch_size:
            raise UserError(f"{self.root}/train holds {len(self.train_set)} images, fewer than one batch "
                            f"of {cfg.train.batch_size} (set train.batch_size lower)")

    def _loader(self, dataset: ImageFolder, train: bool) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(dataset, batch_size=self.cfg.train.batch_size, shuffle=train, drop_last=train,
                          num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
