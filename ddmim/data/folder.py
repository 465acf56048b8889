"""Image folders read with PIL through torchvision's transforms: ImageNet's class folders (ROOT/train/<class>/*,
ROOT/val/<class>/*) or any tree of unlabeled images.

Which files count, with which label, and which are held out for validation where the source has no val split,
follows `ddmim.data.layout`. A file that does not decode is skipped by the policy of `ddmim.data.bad_samples`.
Training batches come from a `ResumableSampler`: a run resumed mid-epoch reads on exactly where it stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ddmim.data.bad_samples import SkippedSamples
from ddmim.data.contracts import check_one_batch_per_rank
from ddmim.data.layout import source_splits, val_listing
from ddmim.data.listing import SplitListing
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.pixels import load_rgb
from ddmim.data.resumable import ResumableSampler, seeded_visit
from ddmim.data.sample_refs import shown
from ddmim.data.transforms import train_transform, val_transform
from ddmim.data.workers import worker_context
from ddmim.errors import UserError, say

MAX_ATTEMPTS = 64  # consecutive undecodable files one item may step over before the data is declared broken


class ListedImages(Dataset):
    """The images of one split's listing, skipping files that do not decode (the next file of the split takes
    the item's place)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform):
        self.samples, self.classes, self.transform, self.loader = samples, classes, transform, load_rgb
        self.skipped = SkippedSamples(len(samples))

    def __len__(self) -> int:
        return len(self.samples)

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
                self.skipped.record(i, shown(path), f"{type(exc).__name__}: {exc}")
                continue
            return self.transform(image), label
        raise UserError(f"{MAX_ATTEMPTS} files in a row from {shown(self.samples[index][0])} on cannot be decoded")


def list_splits(root: Path, layout: str, val_fraction: float, labels: bool = False,
                val_path: str = "") -> tuple[list[str], SplitListing, SplitListing]:
    """`layout.source_splits`, with a notice of the entries it did not read; `val_path` (`--val-data`): the
    validation images, all of `root`'s images then training ones."""
    classes, train, val = source_splits(root, layout, val_fraction, labels, hold_out="never" if val_path else "always")
    if val_path:
        val = val_listing(Path(val_path), classes)
    for source, listing in ((root, train), (val_path, val if val_path else SplitListing())):
        if listing.ignored:
            say(f"ddmim: {source}: {len(listing.ignored)} entries not read, e.g. {listing.ignored[0][0]} "
                f"({listing.ignored[0][1]})")
    return classes, train, val


def _require_images(root: Path, split: str, classes: list[str], train: SplitListing, val: SplitListing,
                    val_fraction: float, val_path: str = "") -> None:
    if split == "val" and val_path and not val.files:
        raise UserError(f"no validation images in --val-data {val_path}")
    if not (train if split == "train" else val).files:
        found = f"{len(train.files) + len(val.files)} images" + (f" in {len(classes)} class folders"
                                                                 if classes else " without class folders")
        held = "" if (root / "val").is_dir() else f"; without val/, data.val_fraction {val_fraction:g} is held out"
        raise UserError(f"no {'training' if split == 'train' else 'validation'} images in {root} ({found}{held})")


def open_split(root: Path, split: str, transform, layout: str = "auto", val_fraction: float = 0.01,
               labels: bool = False, val_path: str = "") -> ListedImages:
    """One split of a folder source; `labels`: refuse an unlabeled source (k-NN, linear probe, fine-tuning)."""
    classes, train, val = list_splits(Path(root), layout, val_fraction, labels, val_path)
    _require_images(Path(root), split, classes, train, val, val_fraction, val_path)
    return ListedImages((train if split == "train" else val).files, classes, transform)


class FolderDataModule(pl.LightningDataModule):
    applies_randaugment = True  # in the PIL pipeline, per image
    data_format = "folder"
    resumes_split_otherwise = True  # `dealt_in_steps`: a step's images depend on the global batch alone

    def __init__(self, root: Path, spec: LoaderSpec, randaugment: str = "", labels: bool = False):
        """`labels`: refuse an unlabeled source."""
        super().__init__()
        self.root = Path(root)
        self.spec = spec
        data = spec.data
        classes, train, val = list_splits(self.root, data.layout, data.val_fraction, labels, data.val_path)
        for split in ("train", "val"):
            _require_images(self.root, split, classes, train, val, data.val_fraction, data.val_path)
        size = spec.img_size
        self.train_set = ListedImages(train.files, classes, train_transform(size, spec.data, randaugment))
        self.val_set = ListedImages(val.files, classes, val_transform(size, spec.data))
        self.num_classes = len(classes)  # 0: unlabeled
        self.train_size = len(self.train_set)
        check_one_batch_per_rank(self.root, len(self.train_set), spec.batch_size)

    @property
    def skipped(self) -> dict:
        return {"train": self.train_set.skipped, "val": self.val_set.skipped}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is None:
            return train_loader(self.train_set, self.spec)
        check_one_batch_per_rank(self.root, len(self.train_set), self.spec.batch_size, trainer.world_size,
                                 trainer.accumulate_grad_batches)
        return train_loader(self.train_set, self.spec, rank=trainer.global_rank, world=trainer.world_size,
                            accumulate=trainer.accumulate_grad_batches, trained_steps=lambda: trainer.global_step)

    def val_dataloader(self) -> DataLoader:
        workers = self.spec.data.num_workers
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(self.val_set, batch_size=self.spec.batch_size, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                          multiprocessing_context=worker_context(world, workers),
                          generator=torch.Generator().manual_seed(self.spec.seed))  # as train_loader's


def train_loader(dataset: ListedImages, spec: LoaderSpec, *, rank: int = 0, world: int = 1, accumulate: int = 1,
                 trained_steps: Callable[[], int] | None = None) -> DataLoader:
    """Rank `rank`'s training batches; each epoch from the batch after the `trained_steps()` a run has taken
    (see `ResumableSampler`). The loader's own generator gives its workers' base seeds, so it draws nothing from
    the training streams."""
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=spec.seed,
                               batch_size=spec.batch_size, accumulate=accumulate, trained_steps=trained_steps)
    workers = spec.data.num_workers
    return DataLoader(dataset, batch_size=spec.batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      multiprocessing_context=worker_context(world, workers),
                      generator=torch.Generator().manual_seed(spec.seed))
