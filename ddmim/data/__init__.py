"""Data modules, one per storage format, behind `make_datamodule`; the format can be told from the path."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from ddmim.config import Config
from ddmim.errors import UserError

FORMATS = ("auto", "folder", "ffcv", "dali")


def detect_format(root: Path) -> str:
    if (root / "train.beton").exists():
        return "ffcv"
    if (root / "train").is_dir() and any((root / "train").glob("*.tar")):
        return "dali"
    return "folder"


def make_datamodule(root: Path, cfg: Config, fmt: str = "auto", channels_last: bool = False) -> pl.LightningDataModule:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data path {root} does not exist or is not a folder")
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "folder":
        from ddmim.data.folder import FolderDataModule

        return FolderDataModule(root, cfg)
    if fmt == "ffcv":
        from ddmim.data.ffcv_loader import FFCVDataModule

        return FFCVDataModule(root, cfg)
    if fmt == "dali":
        from ddmim.data.dali_loader import DALIDataModule

        return DALIDataModule(root, cfg, channels_last=channels_last)
    raise UserError(f"unknown data format '{fmt}'; available: {', '.join(FORMATS)}")
