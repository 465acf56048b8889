"""ImageFolder-layout data (ROOT/train/<class>/*, ROOT/val/<class>/*) read with torchvision.

Which files count follows `ddmim.data.layout` (files directly in a class folder; labels from train's
classes, also for val). A file that does not decode is skipped by the policy of `ddmim.data.bad_samples`.
Training batches come from a `ResumableSampler`: a run resumed mid-epoch reads on exactly where it stopped.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from ddmim.data.bad_samples import SkippedSamples
from ddmim.data.contracts import check_one_batch_per_rank
from ddmim.data.layout import list_split, train_classes
from ddmim.data.pixels import EXTENSIONS, load_rgb
from ddmim.data.resumable import ResumableSampler, seeded_visit
from ddmim.data.transforms import train_transform, val_transform
from ddmim.errors import UserError

MAX_ATTEMPTS = 64  # consecutive undecodable files one item may step over before the data is declared broken


class ClassFolder(ImageFolder):
    """torchvision's ImageFolder with the project's layout rule, given label order, and skipping of files
    that do not decode (the next file of the split takes the item's place)."""

    def __init__(self, root: Path, split: str, classes: list[str], transform):
        self._classes, self._split = classes, split
        super().__init__(str(Path(root) / split), transform=transform, loader=load_rgb)
        self.skipped = SkippedSamples(len(self.samples))

    def find_classes(self, directory):
        return self._classes, {name: i for i, name in enumerate(self._classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        try:
            listing = list_split(Path(directory).parent, self._split, self._classes, EXTENSIONS)
        except UserError as exc:
            raise ValueError(str(exc)) from None  # ImageFolder's constructor passes it on; open_split reports it
        if listing.ignored:
            print(f"ddmim: {directory}: {len(listing.ignored)} entries not read, e.g. {listing.ignored[0][0]} "
                  f"({listing.ignored[0][1]})", file=sys.stderr)
        if not listing.files:
            raise FileNotFoundError(f"no image files in the class folders of {directory}")
        return listing.files

    def __getitem__(self, item):
        """item: an index, or (index, visit seed) from a `ResumableSampler`."""
        if isinstance(item, tuple):
            with seeded_visit(item[1]):
                return self._read(item[0])
        return self._read(item)

    def _read(self, index: int):
        for attempt in range(MAX_ATTEMPTS):
            i = (index + attempt) % len(self.samples)
            if self.skipped.is_failed(i):  # found before, here or by another rank: no second decode or notice
                continue
            path, label = self.samples[i]
            try:
                image = self.loader(path)  # opens and converts to RGB: the full decode
            except Exception as exc:  # PIL raises many types for a damaged file; each means: skip it
                self.skipped.record(i, path, f"{type(exc).__name__}: {exc}")
                continue
            return self.transform(image), label
        raise UserError(f"{MAX_ATTEMPTS} files in a row from {self.samples[index][0]} on cannot be decoded")


def open_split(root: Path, split: str, transform, classes: list[str] | None = None) -> ClassFolder:
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"data path {root} has no '{split}/' folder (expected {root}/{split}/<class>/<image>)")
    try:
        return ClassFolder(root, split, classes or train_classes(root), transform)
    except (FileNotFoundError, OSError, ValueError) as exc:
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
        self.val_set = open_split(self.root, "val", val_transform(size, cfg.data), self.train_set.classes)
        check_one_batch_per_rank(self.root / "train", len(self.train_set), cfg.train.batch_size)

    @property
    def skipped(self) -> dict:
        return {"train": self.train_set.skipped, "val": self.val_set.skipped}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is None:
            return train_loader(self.train_set, self.cfg)
        check_one_batch_per_rank(self.root / "train", len(self.train_set), self.cfg.train.batch_size,
                                 trainer.world_size)
        return train_loader(self.train_set, self.cfg, rank=trainer.global_rank, world=trainer.world_size,
                            global_step=trainer.global_step)

    def val_dataloader(self) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(self.val_set, batch_size=self.cfg.train.batch_size, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(self.cfg.train.seed))  # as train_loader's


def train_loader(dataset: ClassFolder, cfg, *, rank: int = 0, world: int = 1, global_step: int = 0) -> DataLoader:
    """Rank `rank`'s training batches, from the batch after `global_step` on (the step a run resumed at).
    The loader's own generator gives its workers' base seeds, so it draws nothing from the training streams."""
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=cfg.train.seed,
                               batch_size=cfg.train.batch_size)
    sampler.resume_at(global_step)
    workers = cfg.data.num_workers
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(cfg.train.seed))
