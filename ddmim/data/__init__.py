"""Data modules, one per storage format, behind `make_datamodule`."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from ddmim.config import Config
from ddmim.errors import UserError

FORMATS = ("folder",)


def make_datamodule(root: Path, cfg: Config, fmt: str = "folder") -> pl.LightningDataModule:
    if fmt == "folder":
        from ddmim.data.folder import FolderDataModule

        return FolderDataModule(root, cfg)
    raise UserError(f"unknown data format '{fmt}'; available: {', '.join(FORMATS)}")
