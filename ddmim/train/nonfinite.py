"""Skipping optimiser steps whose loss or gradients are not finite, and stopping after too many in a row."""
from __future__ import annotations

import torch

from ddmim.errors import UserError


class NonFiniteTraining(UserError):
    pass


class NonFiniteGuard:
    """Mixin for a LightningModule with automatic optimisation. Gradients are all-reduced before this check
    under data-parallel training, so every rank takes the same decision."""

    max_bad_steps: int = 20
    skipped_steps: int = 0
    bad_in_a_row: int = 0

    def _finite(self, loss) -> bool:
        if loss is None or not torch.isfinite(loss).all():
            return False
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        loss = optimizer_closure()  # forward and backward
        if self._finite(loss):
            self.bad_in_a_row = 0
            optimizer.step(closure=lambda: loss)  # the closure already ran: hand its loss back
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            self.print(f"step {self.global_step}: non-finite loss or gradient, optimiser step skipped "
                       f"({self.bad_in_a_row} in a row, {self.skipped_steps} in all)")
            if self.bad_in_a_row >= self.max_bad_steps:
                last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
                raise NonFiniteTraining(f"training stopped at step {self.global_step}: {self.bad_in_a_row} "
                                        f"consecutive non-finite steps; last good checkpoint: {last}")
        metrics = getattr(self, "step_metrics", None)  # this step's row (written by the StepRows callback)
        if metrics is not None:
            metrics["train/skipped_steps"] = float(self.skipped_steps)
