"""What ddmim's callbacks read of a training LightningModule, declared once for pretraining and fine-tuning."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from ddmim.train.nonfinite import NonFiniteGuard


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
