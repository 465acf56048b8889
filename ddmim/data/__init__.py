"""Data modules, one per storage format, behind `make_datamodule`; the format can be told from the path."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ddmim.data.converted import split_path
from ddmim.data.dali_format import is_dali_conversion
from ddmim.data.dali_view import dali_root
from ddmim.data.layout import require_labels
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.workers import check_workers
from ddmim.errors import UserError

if TYPE_CHECKING:
    from ddmim.data.contracts import TrainingData

FORMATS = ("auto", "folder", "ffcv", "dali")


def detect_format(root: Path) -> str:
    if root.is_file():
        return "folder"  # a file list
    if (root / "train.beton").exists():
        return "ffcv"
    # shards without DALI's indexes are WebDataset shards of another tool, a folder source
    return "dali" if is_dali_conversion(root) else "folder"


def require(fmt: str) -> None:
    """One line, not a traceback, when the library of a converted data set's format is not installed."""
    import importlib

    module, extra = {"ffcv": ("ffcv", "ffcv"), "dali": ("nvidia.dali", "dali")}[fmt]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"reading {fmt.upper()} data needs the {module} package, which does not import here "
                        f"({exc}); install it with pip install 'ddmim[{extra}]' (make install-all)") from None


def make_datamodule(root: Path, cfg, fmt: str = "auto", channels_last: bool = False,
                    randaugment: str = "", labels: bool = False) -> TrainingData:
    """`cfg`: a pretraining or fine-tuning config, of which the data module gets a `LoaderSpec`; `labels`:
    refuse an unlabeled source."""
    root, spec = Path(root), LoaderSpec.of(cfg)
    if not root.exists():
        raise UserError(f"data path {root} does not exist")
    check_workers(cfg.data.num_workers)
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "folder":
        from ddmim.data.folder import FolderDataModule

        return FolderDataModule(root, spec, randaugment, labels)
    if fmt == "dali":
        require("dali")  # before a view of the shards is made for it
        root = dali_root(root, spec.data.val_fraction)
    if fmt in ("ffcv", "dali") and labels:
        require_labels(root)
    if fmt == "ffcv":
        require("ffcv")
        from ddmim.data.ffcv_loader import FFCVDataModule

        return FFCVDataModule(root, spec)
    if fmt == "dali":
        from ddmim.data.dali_module import DALIDataModule

        return DALIDataModule(root, spec, channels_last=channels_last)
    raise UserError(f"unknown data format '{fmt}'; available: {', '.join(FORMATS)}")


def eval_batches(root: Path, cfg, split: str, fmt: str = "auto", device=None, labels: bool = False):
    """Every image of a split once, with the validation transform (centre crop), in a fixed order; on
    `device` (CUDA: the fast loaders decode there), else on the CPU. `labels`: refuse an unlabeled source."""
    import torch

    root, spec = Path(root), LoaderSpec.of(cfg)
    if not root.exists():
        raise UserError(f"data path {root} does not exist")
    fmt = detect_format(root) if fmt == "auto" else fmt
    device = torch.device(device or "cpu")
    if fmt in ("ffcv", "dali"):
        require(fmt)
        root = dali_root(root, spec.data.val_fraction) if fmt == "dali" else root
        if labels:
            require_labels(root)
    if fmt == "ffcv":
        from ddmim.data.ffcv_loader import make_loader

        loader = make_loader(split_path(root, split, fmt, spec.data.val_path), spec, train=False, device=device,
                             drop_last=False)
        return ((x.clone(), y.clone()) for x, y in loader)  # FFCV reuses its batch buffers
    if fmt == "dali":
        from ddmim.data.dali_loader import open_loader

        return open_loader(split_path(root, split, fmt, spec.data.val_path), spec, train=False,
                           gpu=device.type == "cuda")
    from torch.utils.data import DataLoader

    from ddmim.data.folder import open_split
    from ddmim.data.transforms import val_transform

    dataset = open_split(root, split, val_transform(spec.img_size, spec.data), spec.data.layout,
                         spec.data.val_fraction, labels=labels, val_path=spec.data.val_path)
    return DataLoader(dataset, batch_size=spec.batch_size, num_workers=spec.data.num_workers,
                      pin_memory=device.type == "cuda")
