"""What ddmim's callbacks read of a training LightningModule, declared once for pretraining and fine-tuning."""
from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch

from ddmim.errors import UserError
from ddmim.train.accumulation import rescale_epoch_progress
from ddmim.train.nonfinite import NonFiniteGuard

PROCESSES_KEY = "ddmim_processes"
ACCUMULATE_KEY = "ddmim_accumulate"
BATCH_KEY = "ddmim_batch_size"
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

    def _split(self) -> tuple[int | None, int, int]:
        """(per-device batch, processes, micro-batches a step): how this run splits its global batch."""
        spec = getattr(getattr(self.trainer, "datamodule", None), "spec", None)
        return getattr(spec, "batch_size", None), self.trainer.world_size, self.trainer.accumulate_grad_batches

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[BATCH_KEY], checkpoint[PROCESSES_KEY], checkpoint[ACCUMULATE_KEY] = self._split()
        checkpoint[DATA_KEY] = self._data()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A run resumed with another global batch would be another run, and on other data too: both refused.
        Split otherwise (processes, accumulation, per-device batch), the folder and FFCV formats deal the same
        steps (their order follows the global batch) and DALI deals the rest of the epoch anew; FFCV's
        quasi_random order, FFCV's own, keeps its split."""
        if checkpoint.get(PROCESSES_KEY) is not None and self._trainer is not None:
            now = self._split()
            saved = (checkpoint.get(BATCH_KEY) or _config_batch(checkpoint) or now[0], checkpoint[PROCESSES_KEY],
                     checkpoint.get(ACCUMULATE_KEY, 1))
            if now[0] is not None and math.prod(saved) != math.prod(now):
                raise UserError(f"--resume auto: this run's global batch is {_spelt(saved)} and this resume would "
                                f"make it {_spelt(now)}; give the run's train.global_batch={math.prod(saved)} to "
                                "resume it split otherwise")
            data = getattr(self.trainer, "datamodule", None)
            if saved[:2] != now[:2] and not getattr(data, "resumes_split_otherwise", True):
                raise UserError(f"--resume auto: this run was trained on {saved[1]} process(es) (devices x nodes) "
                                f"in batches of {saved[0]} and is resumed on {now[1]} in batches of {now[0]}; "
                                "FFCV's quasi_random order is FFCV's own and follows the split, so resume it on "
                                f"{saved[1]} with train.batch_size={saved[0]} (data.ffcv_order random resumes on "
                                "any split of the global batch)")
            if saved[2] != now[2]:
                rescale_epoch_progress(checkpoint, saved[2], now[2])
        before, now = checkpoint.get(DATA_KEY), self._data() if self._trainer is not None else None
        if before and now and before != now:
            raise UserError(f"--resume auto: this run trained on {before['train_size']} images in {before['format']} "
                            f"format and --data gives {now['train_size']} in {now['format']} format; a resumed run "
                            "keeps its data (its order and epochs follow it): give the run's --data, or start a new "
                            "run with another --out")


def _config_batch(checkpoint: dict[str, Any]) -> int | None:
    """The per-device batch in the run config a checkpoint of an earlier ddmim keeps in its hyper-parameters."""
    config = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
    return (config.get("train") or {}).get("batch_size")


def _spelt(split: tuple[int, int, int]) -> str:
    return f"{split[0]} x {split[1]} process(es) x {split[2]} micro-batch(es) = {math.prod(split)}"
