"""What ddmim's callbacks read of a training LightningModule, declared once for pretraining and fine-tuning."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from ddmim.errors import UserError
from ddmim.train.nonfinite import NonFiniteGuard

PROCESSES_KEY = "ddmim_processes"
DATA_KEY = "ddmim_data"


class TrainingModule(NonFiniteGuard, pl.LightningModule):
    """`step_metrics`: this step's row of device tensors, which the StepRows callback writes on logging steps
    (the skipped-step counter of NonFiniteGuard joins it); `flops_per_image`: for the throughput report."""

    def __init__(self, max_bad_steps: int, check_every: int):
        super().__init__()
        self.max_bad_steps, self.check_every = max_bad_steps, check_every
        self.step_metrics: dict[str, torch.Tensor] = {}

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
        checkpoint[DATA_KEY] = self._data()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A run resumed on another number of processes would deal its data and batches differently (each
        process's share of an epoch, the global batch and the learning rate scaled to it), and on other data it
        would be another run: both refused."""
        saved = checkpoint.get(PROCESSES_KEY)
        if saved is not None and self._trainer is not None and saved != self.trainer.world_size:
            raise UserError(f"--resume auto: this run was trained on {saved} process(es) (devices x nodes) and is "
                            f"resumed on {self.trainer.world_size}; its global batch, data order and learning rate "
                            f"follow that count, so resume it on {saved}")
        before, now = checkpoint.get(DATA_KEY), self._data() if self._trainer is not None else None
        if before and now and before != now:
            raise UserError(f"--resume auto: this run trained on {before['train_size']} images in {before['format']} "
                            f"format and --data gives {now['train_size']} in {now['format']} format; a resumed run "
                            "keeps its data (its order and epochs follow it): give the run's --data, or start a new "
                            "run with another --out")
