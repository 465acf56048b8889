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
import sys

import torch


class SkippedSamples:
    """Which samples of one split failed, shared with loader worker processes (inherited shared memory)."""

    def __init__(self, size: int):
        self._failed = mp.Array(ctypes.c_bool, max(1, size), lock=False)
        self._count = mp.Value(ctypes.c_int64, 0)

    def record(self, index: int, where: str, reason: str) -> None:
        if self._mark(index):
            print(f"ddmim: skipping a sample that cannot be decoded: {where} ({reason})", file=sys.stderr, flush=True)

    def _mark(self, index: int) -> bool:
        if self._failed[index]:
            return False
        self._failed[index] = True
        with self._count.get_lock():
            self._count.value += 1
        return True

    def is_failed(self, index: int) -> bool:
        return bool(self._failed[index])

    def failed(self) -> list[int]:
        return [i for i, bad in enumerate(self._failed) if bad]

    def mark(self, indices) -> None:
        """Samples another rank found (and named): counted here too, and skipped without a word."""
        for index in indices:
            self._mark(index)

    @property
    def count(self) -> int:
        return int(self._count.value)


def fill_from_others(images: torch.Tensor, labels: torch.Tensor, bad: list[int]) -> bool:
    """Gives each bad position of the batch a good sample of the same batch, in place; False if none is good."""
    failed = set(bad)
    good = [i for i in range(len(images)) if i not in failed]
    if not good:
        return False
    for k, position in enumerate(bad):
        images[position] = images[good[k % len(good)]]
        labels[position] = labels[good[k % len(good)]]
    return True
