"""Callbacks that measure a run: training throughput with data-wait share, and the validation-loss history."""
from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


class ThroughputReport(pl.Callback):
    """Images/s of training steps and the share of time spent waiting for the loader.

    The first `warmup` batches (worker start-up, allocator and kernel warm-up) are not counted.
    Time between an epoch's start and its first batch counts as data wait.
    """

    def __init__(self, warmup: int = 5):
        self.warmup = warmup
        self.seen = 0
        self.images = 0
        self.wait_s = 0.0
        self.step_s = 0.0
        self._mark = 0.0

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.seen >= self.warmup:
            self.wait_s += now - self._mark
        self._mark = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        now = time.perf_counter()
        if self.seen >= self.warmup:
            self.step_s += now - self._mark
            self.images += len(batch[0]) * trainer.world_size
        self.seen += 1
        self._mark = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.images:
            pl_module.log_dict({"perf/images_per_s": self.images_per_s, "perf/data_wait_share": self.data_wait_share})

    @property
    def images_per_s(self) -> float:
        total = self.wait_s + self.step_s
        return self.images / total if total > 0 else float("nan")

    @property
    def data_wait_share(self) -> float:
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else float("nan")


class ValLossHistory(pl.Callback):
    """Validation loss after each validation run (sanity checks excluded), and the step it was taken at."""

    def __init__(self):
        self.losses: list[float] = []
        self.steps: list[int] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.losses.append(float(value))
            self.steps.append(trainer.global_step)
