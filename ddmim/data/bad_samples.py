"""One policy for a sample that cannot be decoded, in every format: a multi-day run must not end on it.

The sample is left out (its place in the batch goes to another sample), it is named on stderr the first
time it fails (its path, its shard and key, or its .beton index), and each distinct one is counted. The run
logs the count as `data/skipped_samples` and stops with one line once it exceeds `data.max_bad_samples`:
past that, the data set itself is damaged and needs converting again.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import sys

import pytorch_lightning as pl
import torch

from ddmim.errors import UserError
from ddmim.train.callbacks import write_row


class SkippedSamples:
    """Which samples of one split failed, shared with loader worker processes (inherited shared memory)."""

    def __init__(self, size: int):
        self._failed = mp.Array(ctypes.c_bool, max(1, size), lock=False)
        self._count = mp.Value(ctypes.c_int64, 0)

    def record(self, index: int, where: str, reason: str) -> None:
        if self._failed[index]:
            return
        self._failed[index] = True
        with self._count.get_lock():
            self._count.value += 1
        print(f"ddmim: skipping a sample that cannot be decoded: {where} ({reason})", file=sys.stderr, flush=True)

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


class BadSampleGuard(pl.Callback):
    """Logs the data module's count of skipped samples and stops the run past `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen = 0

    def _check(self, trainer, pl_module) -> None:
        count = getattr(trainer.datamodule, "skipped_samples", lambda: 0)()
        if trainer.world_size > 1:  # every rank reads other samples: the total decides, and every rank stops
            total = torch.tensor(float(count), device=pl_module.device)
            count = int(trainer.strategy.reduce(total, reduce_op="sum").item())
        if count != self.seen:
            self.seen = count
            write_row(trainer, {"data/skipped_samples": float(count)})
        if count > self.limit:
            raise UserError(f"stopped: {count} samples could not be decoded, more than data.max_bad_samples = "
                            f"{self.limit}; the data set looks damaged (the lines above name the samples)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)
