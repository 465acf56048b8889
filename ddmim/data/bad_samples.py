"""One policy for a sample that cannot be decoded, in every format: a multi-day run must not end on it.

The sample is left out (its place in the batch goes to another sample), it is named on stderr the first
time it fails (its path, its shard and key, or its .beton index), and each distinct one is counted. The run
logs the count as `data/skipped_samples` and stops with one line once it exceeds `data.max_bad_samples`:
past that, the data set itself is damaged and needs converting again (`ddmim.train.bad_sample_guard`).
Under data-parallel training the ranks exchange what they found, so a sample is counted once in all and a
rank that meets a sample another rank named skips it without a word.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
from typing import Callable

import torch

from ddmim.errors import say


class SkippedSamples:
    """Which samples of one split failed, shared with loader worker processes (inherited shared memory)."""

    def __init__(self, size: int):
        # forkserver's objects: inherited by forked workers, and passed to a data-parallel rank's forkserver ones
        # (a fork-context lock is unlinked at once, so no other process could open it)
        context = mp.get_context("forkserver")
        self._failed = context.Array(ctypes.c_bool, max(1, size), lock=False)
        self._count = context.Value(ctypes.c_int64, 0)
        self._on_device: torch.Tensor | None = None  # failures a loader found on the device, not yet recorded
        self._describe: Callable[[int], tuple[str, str]] | None = None

    def record(self, index: int, where: str, reason: str) -> None:
        if self._mark(index):
            say(f"ddmim: skipping a sample that cannot be decoded: {where} ({reason})")

    def _mark(self, index: int) -> bool:
        if self._failed[index]:
            return False
        self._failed[index] = True
        with self._count.get_lock():
            self._count.value += 1
        return True

    def is_failed(self, index: int) -> bool:
        return bool(self._failed[index])

    def note(self, failed: torch.Tensor, indices: torch.Tensor, describe: Callable[[int], tuple[str, str]]) -> None:
        """Failures a loader found on the device ((B,) flags and sample indices, device tensors), kept there and
        recorded (named, counted) when the count or the list is next read, on the steps that log: finding
        them never makes the host wait. `describe(index)` gives (where, reason)."""
        if self._on_device is None:
            self._on_device = torch.zeros(len(self._failed), dtype=torch.uint8, device=failed.device)
            self._describe = describe
        safe = indices.clamp(0, len(self._failed) - 1)  # the index read from an image that did not fail is noise
        self._on_device.scatter_reduce_(0, safe, failed.to(torch.uint8), reduce="amax")

    def _settle(self) -> None:
        if self._on_device is None:
            return
        for index in self._on_device.nonzero().flatten().tolist():
            self.record(index, *self._describe(index))
        self._on_device.zero_()

    def failed(self) -> list[int]:
        self._settle()
        return [i for i, bad in enumerate(self._failed) if bad]

    def mark(self, indices) -> None:
        """Samples another rank found (and named): counted here too, and skipped without a word."""
        for index in indices:
            self._mark(index)

    @property
    def count(self) -> int:
        self._settle()
        return int(self._count.value)


def on_host(tensor: torch.Tensor) -> bool:
    """Whether reading the tensor's values costs no device synchronisation."""
    return tensor.device.type == "cpu"


def fill_from_others(images: torch.Tensor, labels: torch.Tensor, failed: torch.Tensor, spare: tuple) -> tuple:
    """(images, labels) where each failed position (a (B,) bool device tensor) holds a good sample of the same
    batch, or `spare` ((3, H, W) image, label: a good sample of an earlier batch) when none is good. Computed on
    the device without the host reading `failed`, so every batch on a GPU pays one gather (tens of microseconds
    there). Also returns a new spare."""
    if on_host(failed) and not failed.any():
        # reading the flags costs nothing here, while the gather would copy the whole batch twice: 54 ms a batch
        # of 64 at 224 px on one core, more than FFCV takes to decode it
        return images, labels, spare
    positions = torch.arange(len(failed), device=failed.device)
    good_first = torch.argsort(failed.to(torch.int8), stable=True)
    good = (~failed).sum()
    nth_failed = torch.cumsum(failed, 0) - 1
    source = torch.where(failed, good_first[nth_failed.clamp(min=0) % good.clamp(min=1)], positions)
    none_good = (good == 0).view(1)
    use_spare = failed & none_good
    images = torch.where(use_spare.view(-1, 1, 1, 1), spare[0].unsqueeze(0), images[source])
    labels = torch.where(use_spare, spare[1], labels[source])
    spare = (torch.where(none_good.view(1, 1, 1), spare[0], images[0]), torch.where(none_good[0], spare[1], labels[0]))
    return images, labels, spare
