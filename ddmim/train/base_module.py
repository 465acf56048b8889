"""What ddmim's callbacks read of a training LightningModule, declared once for pretraining and fine-tuning."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from ddmim.errors import UserError
from ddmim.train.accumulation import rescale_epoch_progress
from ddmim.train.nonfinite import NonFiniteGuard

PROCESSES_KEY = "ddmim_processes"
ACCUMULATE_KEY = "ddmim_accumulate"
DATA_KEY = "ddmim_data"


class TrainingModule(NonFiniteGuard, pl.LightningModule):
    """`step_metrics`: this step's row of device tensors, which the StepRows callback writes on logging steps
    (the skipped-step counter of NonFiniteGuard joins it); `flops_per_image`: for the throughput report."""

    def __init__(self, max_bad_steps: int, check_every: int):
        super().__init__()
        self.max_bad_steps, self.check_every = max_bad_steps, check_every
        self.step_metrics: dict[str, torch.Tensor] = {}

    def record_step_row(self, metrics: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Makes `metrics` of this micro-batch part of the step's row: the mean over the step's micro-batches so
        far, so that a step's loss is its global batch's, not its last micro-batch's (device tensors: no wait)."""
        seen = batch_idx % self.trainer.accumulate_grad_batches  # an epoch's first batch starts a step
        if seen == 0:
            self.step_metrics = dict(metrics)
            return
        for name, value in metrics.items():
            self.step_metrics[name] = self.step_metrics[name] + (value - self.step_metrics[name]) / (seen + 1)

    def flops_per_image(self, batch: int = 2) -> float | None:
        """FLOPs of one training image, forward and backward; None: not counted."""
        return None

    def _data(self) -> dict | None:
        """What identifies the training data: its format and size (a TrainingData's)."""
        data = getattr(self.trainer, "datamodule", None)
        if not hasattr(data, "train_size"):
            return None
        return {"format": data.data_format, "train_size": data.train_size}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PROCESSES_KEY] = self.trainer.world_size
        checkpoint[ACCUMULATE_KEY] = self.trainer.accumulate_grad_batches
        checkpoint[DATA_KEY] = self._data()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A run resumed with another global batch would be another run, and on other data too: both refused.
        On another process count the folder and FFCV formats deal the same steps (their order follows the global
        batch); DALI deals each process its own shards, so there the count is kept."""
        saved = checkpoint.get(PROCESSES_KEY)
        if saved is not None and self._trainer is not None:
            saved_acc, world, acc = checkpoint.get(ACCUMULATE_KEY, 1), self.trainer.world_size, \
                self.trainer.accumulate_grad_batches
            if saved * saved_acc != world * acc:
                raise UserError(f"--resume auto: this run's global batch is {saved} process(es) x {saved_acc} "
                                f"micro-batch(es) of its batch size and this resume would make it {world} x {acc}; "
                                "give the run's train.global_batch (its per-device batch x processes x "
                                "micro-batches) to resume it on this process count")
            data_format = (self._data() or {}).get("format")
            if saved != world and data_format not in ("folder", "ffcv"):
                raise UserError(f"--resume auto: this run was trained on {saved} process(es) (devices x nodes) and "
                                f"is resumed on {world}; {data_format} data is dealt to each process on its own, so "
                                f"resume it on {saved} (folder and FFCV data resume on any process count)")
            if saved_acc != acc:
                rescale_epoch_progress(checkpoint, saved_acc, acc)
        before, now = checkpoint.get(DATA_KEY), self._data() if self._trainer is not None else None
        if before and now and before != now:
            raise UserError(f"--resume auto: this run trained on {before['train_size']} images in {before['format']} "
                            f"format and --data gives {now['train_size']} in {now['format']} format; a resumed run "
                            "keeps its data (its order and epochs follow it): give the run's --data, or start a new "
                            "run with another --out")
