"""FFCV data (ROOT/train.beton, ROOT/val.beton from data_prep/to_ffcv.py) through ffcv.loader.Loader.

Decoding, cropping and flipping run in FFCV's compiled (numba) pipeline. On CUDA the uint8 batch goes
to the GPU right after decoding (non-blocking) and is normalised there by torch (FFCV's own GPU
normalisation imports cupy, which neither ddmim nor a usual cluster installs); on the CPU everything stays
on the CPU, with FFCV's normalisation before ToTensor (ffcv 1.0.2 never finishes compiling the opposite
order there).
The decoders check every JPEG (`ffcv_decoders`); a sample that does not decode is skipped by the policy of
`ddmim.data.bad_samples`. Files of older converters held placeholders (label -1) for undecodable sources; they
are never read.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from ddmim.data.bad_samples import SkippedSamples, fill_from_others
from ddmim.data.contracts import check_one_batch_per_rank
from ddmim.data.converted import split_path
from ddmim.data.layout import read_class_count
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.resumable import dealt_in_steps, resume_position
from ddmim.data.workers import loader_threads
from ddmim.errors import UserError

PLACEHOLDER_LABEL = -1  # what older versions of data_prep/to_ffcv.py left in a .beton for a file that did not decode


def readable_indices(path: Path) -> np.ndarray:
    """Indices of the real samples of a .beton (placeholders left out); a clear error for a missing file or
    another format."""
    from ffcv.reader import Reader

    if not path.is_file():
        raise UserError(f"FFCV file {path} does not exist (make it with data_prep/to_ffcv.py)")
    try:
        reader = Reader(str(path))
        labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    except Exception as exc:  # ffcv raises assorted errors for a file that is not a .beton
        raise UserError(f"{path} is not an FFCV .beton file ({type(exc).__name__}: {exc})") from None
    return np.flatnonzero(labels != PLACEHOLDER_LABEL)


class CheckedBatches:
    """An FFCV loader whose batches lose the samples that failed to decode (see `ffcv_decoders`): each one's
    place goes to another sample, found and filled on the batch's device; they are named and counted on the
    steps that log (`SkippedSamples.note`)."""

    def __init__(self, loader, path: Path, spec: LoaderSpec, skipped: SkippedSamples):
        from ddmim.data.ffcv_decoders import MarkReader

        self.loader, self.path, self.skipped = loader, path, skipped
        self.read_marks = MarkReader(spec.data.mean, spec.data.std)
        self.spare = None  # a good (image, label) on the device, for a batch in which no sample decodes

    def __len__(self) -> int:
        return len(self.loader)

    def _describe(self, index: int) -> tuple[str, str]:
        return f"{self.path} sample {index}", "its JPEG data does not decode"

    def __iter__(self):
        with torch_threads_kept():
            batches = iter(self.loader)
        for images, labels in batches:
            failed, samples = self.read_marks(images)
            if images.dtype == torch.uint8:  # the CUDA pipeline's raw pixels
                images = self.read_marks.normalise(images)
            self.skipped.note(failed, samples, self._describe)
            if self.spare is None:  # the host looks until it has kept a good sample: once per loader, mostly
                good = (~failed).nonzero()
                if len(good) == 0:
                    continue
                self.spare = (images[good[0, 0]].clone(), labels[good[0, 0]].clone())
            images, labels, self.spare = fill_from_others(images, labels, failed, self.spare)
            yield images, labels


@contextlib.contextmanager
def torch_threads_kept():
    """FFCV's Loader sets torch's intra-op thread count to its own worker count, when it is built and at every
    epoch (`Compiler.set_num_threads`): training would run on `data.num_workers` threads, not on the process's
    (the cores, OMP_NUM_THREADS, torch.set_num_threads). The count stays what it was."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:  # only where FFCV changed it
            torch.set_num_threads(threads)


def image_pipeline(decoder, spec: LoaderSpec, device: torch.device) -> list:
    """The decoder (which crops and flips) and, on the CPU, the normalisation (on CUDA `CheckedBatches`
    normalises the uint8 batch)."""
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    mean = np.array(spec.data.mean) * 255
    std = np.array(spec.data.std) * 255
    if device.type == "cuda":
        return [decoder, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
    return [decoder, NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]


def label_pipeline(device: torch.device) -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]


class ResumedOrder:
    """FFCV's seeded traversal order (a permutation per epoch) in which the epoch a run resumed in starts at the
    batch the run stopped at: the batches before are never read. ffcv 1.0.2's Loader refuses a TraversalOrder
    class of one's own (its check takes an instance and then calls it), so this replaces the built one."""

    def __init__(self, order, *, epoch: int, skip: int, keep: int):
        self.order, self.epoch, self.skip, self.keep = order, epoch, skip, keep

    def sample_order(self, epoch: int):
        order = self.order.sample_order(epoch)[:self.keep]  # the loader drops the last partial batch
        return order[self.skip:] if epoch == self.epoch else order


class DealtOrder:
    """FFCV's random training order: the folder loader's (`dealt_in_steps`) over the readable samples, so a step
    trains the same images at one global batch however it is split (processes, accumulation, per-device batch),
    and a run resumes on another split."""

    def __init__(self, indices: np.ndarray, **dealing):
        self.indices, self.dealing = indices, dealing

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices[dealt_in_steps(len(self.indices), epoch=epoch, **self.dealing)]


def resume_loader(loader, global_step: int, accumulate: int = 1) -> None:
    """Makes an FFCV training loader go on after `global_step` optimiser steps of `accumulate` batches each."""
    epoch, done = resume_position(global_step, len(loader), accumulate)
    loader.next_epoch = epoch
    loader.traversal_order = ResumedOrder(loader.traversal_order, epoch=epoch, skip=done * loader.batch_size,
                                          keep=len(loader) * loader.batch_size)


def make_loader(path: Path, spec: LoaderSpec, *, train: bool, device: torch.device, world: int = 1, rank: int = 0,
                order: str = "random", os_cache: bool = True, drop_last: bool | None = None, batch_size=None,
                skipped: SkippedSamples | None = None, global_step: int = 0, accumulate: int = 1) -> CheckedBatches:
    """Process `rank` of `world`'s loader; `accumulate` (micro-batches a step) and `global_step`, for training:
    how the epoch is dealt (`DealtOrder`) and the step a run resumed at (see `resume_loader`)."""
    from ffcv.loader import Loader, OrderOption

    from ddmim.data.ffcv_decoders import CheckedCenterCrop, CheckedRandomResizedCrop

    size = (spec.img_size, spec.img_size)
    if train:
        decoder = CheckedRandomResizedCrop(size, scale=tuple(spec.data.crop_scale), ratio=tuple(spec.data.crop_ratio),
                                           seed=spec.seed, flip=spec.data.hflip)
        traversal = OrderOption.QUASI_RANDOM if order == "quasi_random" else OrderOption.RANDOM
    else:
        decoder = CheckedCenterCrop(size, ratio=spec.data.val_crop_ratio)
        traversal = OrderOption.SEQUENTIAL
    distributed = world > 1
    if distributed and traversal == OrderOption.QUASI_RANDOM:
        raise UserError("ffcv quasi_random order does not support data-parallel training; use order random")
    indices = readable_indices(path)
    with torch_threads_kept():
        loader = Loader(str(path), batch_size=batch_size or spec.batch_size,
                        num_workers=loader_threads(spec.data.num_workers), order=traversal, os_cache=os_cache,
                        drop_last=train if drop_last is None else drop_last, distributed=distributed,
                        indices=indices, seed=spec.seed,
                        pipelines={"image": image_pipeline(decoder, spec, device), "label": label_pipeline(device)})
    if train and traversal == OrderOption.RANDOM:
        loader.traversal_order = DealtOrder(indices, seed=spec.seed, world=world, rank=rank, accumulate=accumulate,
                                            batch_size=loader.batch_size)
        loader.first_traversal_order = loader.next_traversal_order()  # the loader's length is read from it
    if train and global_step:
        resume_loader(loader, global_step, accumulate)
    return CheckedBatches(loader, path, spec, skipped or SkippedSamples(int(indices.max(initial=0)) + 1))


class FFCVDataModule(pl.LightningDataModule):
    applies_randaugment = False
    data_format = "ffcv"

    def __init__(self, root: Path, spec: LoaderSpec):
        super().__init__()
        self.root, self.spec = Path(root), spec
        self._val = None
        self.paths = {split: split_path(self.root, split, "ffcv", spec.data.val_path) for split in ("train", "val")}
        indices = {split: readable_indices(path) for split, path in self.paths.items()}
        self.train_size = len(indices["train"])
        self.skipped = {split: SkippedSamples(int(i.max(initial=0)) + 1) for split, i in indices.items()}
        self.num_classes = read_class_count(self.root)
        check_one_batch_per_rank(self.root / "train.beton", self.train_size, spec.batch_size)

    @property
    def resumes_split_otherwise(self) -> bool:
        return self.spec.data.ffcv_order == "random"  # `DealtOrder`; quasi_random is FFCV's own order

    def _loader(self, split: str, train: bool):
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return make_loader(self.paths[split], self.spec, train=train, device=device, world=world, rank=rank,
                           order=self.spec.data.ffcv_order,
                           os_cache=self.spec.data.ffcv_os_cache, skipped=self.skipped[split],
                           global_step=trainer.global_step if trainer is not None and train else 0,
                           accumulate=trainer.accumulate_grad_batches if trainer is not None else 1)


    def train_dataloader(self):
        if self.trainer is not None:
            check_one_batch_per_rank(self.root / "train.beton", self.train_size, self.spec.batch_size,
                                     self.trainer.world_size, self.trainer.accumulate_grad_batches)
        return self._loader("train", train=True)

    def val_dataloader(self):
        # one loader for every validation of the process: each FFCV loader compiles its pipeline (seconds), and
        # a run validates before training, during fit and after it
        if self._val is None:
            self._val = self._loader("val", train=False)
        return self._val
