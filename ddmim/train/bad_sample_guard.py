"""Stopping a run whose data set is damaged: past `data.max_bad_samples` samples that do not decode.

The data module's `skipped` ({split: SkippedSamples}) says which samples failed on this rank. It is read every
`every` steps (the steps that log) and at the end of each validation: a loader that checks its batches on the
device (FFCV) makes the host wait only then. Under data-parallel training the ranks exchange those lists at
those steps, the same on every rank: each one then counts the union (a sample two ranks met is one sample),
and every rank takes the same decision to stop.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch.distributed as dist

from ddmim.errors import UserError
from ddmim.train.accumulation import optimizer_stepped
from ddmim.train.callbacks import write_row


def exchange_failures(skipped: dict) -> None:
    """Every rank ends with every rank's failed samples marked (a collective: all ranks call it together)."""
    local = {split: s.failed() for split, s in skipped.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    for found in gathered:
        for split, indices in found.items():
            skipped[split].mark(indices)


class BadSampleGuard(pl.Callback):
    """Logs the data module's count of skipped samples and stops the run past `limit`."""

    def __init__(self, limit: int, every: int = 50):
        self.limit, self.every = limit, max(1, every)
        self.seen = 0

    def _check(self, trainer) -> None:
        data = trainer.datamodule  # a TrainingData, or None where batches are handed to fit directly
        skipped = data.skipped if data is not None else {}
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            exchange_failures(skipped)
        count = sum(s.count for s in skipped.values())
        if count != self.seen:
            self.seen = count
            write_row(trainer, {"data/skipped_samples": float(count)})
        if count > self.limit:
            raise UserError(f"stopped: {count} samples could not be decoded, more than data.max_bad_samples = "
                            f"{self.limit}; the data set looks damaged (the lines above name the samples)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if optimizer_stepped(trainer) and trainer.global_step % self.every == 0:
            self._check(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)
