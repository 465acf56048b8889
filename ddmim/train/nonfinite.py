"""Skipping optimiser steps whose loss or gradients are not finite, and stopping after too many in a row, without
making the host wait for the device on every step.

The check stays on the device: a flag (GradScaler's own kernel over the gradients, and the loss) goes to the
fused AdamW as `found_inf`, which then leaves the weights and its step count as they were, and the EMA update
uses it to leave the teacher too. The counters are device tensors, read every `check_every` steps (the
logging cadence): bad steps are reported and, if a run of `max_bad_steps` in a row happened since the last
check (the longest run is kept on the device, so one good step before the check does not hide it), training
stops there.
A skipped step still counts as a step (its lr and mask draws advance), since only the device knows it was
skipped.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ddmim.errors import UserError
from ddmim.train.checkpoint_files import last_usable_checkpoint


class NonFiniteTraining(UserError):
    pass


def nonfinite_flag(loss: torch.Tensor | None, params) -> torch.Tensor:
    """A 0-dim float32 tensor on the loss's device: 1 when the loss or any gradient holds NaN or inf, else 0."""
    grads = defaultdict(list)
    for p in params:
        if p.grad is not None:
            grads[(p.grad.device, p.grad.dtype)].append(p.grad)
    device = loss.device if loss is not None else next(iter(grads), (torch.device("cpu"),))[0]
    found = torch.zeros((), dtype=torch.float32, device=device)
    if loss is None:
        return found + 1
    one = torch.ones((), dtype=torch.float32, device=device)
    for group in grads.values():  # GradScaler's check, with a scale of 1: no gradient changes
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
    return torch.maximum(found, (~torch.isfinite(loss.detach())).all().float())


class NonFiniteGuard:
    """Mixin for a LightningModule with automatic optimisation and a fused torch optimiser. Gradients are
    all-reduced before the check under data-parallel training, so every rank takes the same decision."""

    max_bad_steps: int = 20
    check_every: int = 50
    step_metrics: dict[str, torch.Tensor]

    def _guard_state(self) -> dict:
        if not hasattr(self, "_nonfinite"):
            zero = torch.zeros((), dtype=torch.float32, device=self.device)
            self._nonfinite = {"skipped": zero.clone(), "in_a_row": zero.clone(), "longest": zero.clone(),
                               "last": zero.clone(), "reported": 0}
        return self._nonfinite

    @property
    def skipped_steps(self) -> int:
        return int(self._guard_state()["skipped"].item())

    @property
    def step_skipped(self) -> torch.Tensor:
        """This step's flag (a device tensor): 1 when its update was skipped."""
        return self._guard_state()["last"]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        loss = optimizer_closure()  # forward and backward
        state = self._guard_state()
        flag = nonfinite_flag(loss, self.parameters())
        inner = getattr(optimizer, "optimizer", optimizer)
        # the fused optimiser skips its update where found_inf is set. Under 16-mixed, GradScaler puts its own
        # flag there (the same check, over the scaled gradients) and deletes it after the step: the attribute
        # is removed here only while it is still this guard's
        inner.found_inf = flag
        try:
            optimizer.step(closure=lambda: loss)  # the closure already ran: hand its loss back
        finally:
            if getattr(inner, "found_inf", None) is flag:
                del inner.found_inf
        state["last"] = flag
        state["skipped"] += flag
        state["in_a_row"] = (state["in_a_row"] + flag) * flag
        state["longest"] = torch.maximum(state["longest"], state["in_a_row"])
        self.step_metrics["train/skipped_steps"] = state["skipped"]  # this step's row (see TrainingModule)
        if (self.global_step + 1) % self.check_every == 0:  # the step index: Lightning counts it after this hook
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        """Reads the counters (a synchronisation: only every `check_every` steps)."""
        state = self._guard_state()
        skipped, longest = int(state["skipped"].item()), int(state["longest"].item())
        state["longest"] = state["in_a_row"].clone()  # the next check looks at the runs from here on
        if skipped > state["reported"]:
            self.print(f"step {self.global_step}: {skipped - state['reported']} optimiser steps skipped for a "
                       f"non-finite loss or gradient since the last check ({longest} in a row at most, "
                       f"{skipped} in all)")
            state["reported"] = skipped
        if longest >= self.max_bad_steps:
            folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            last = last_usable_checkpoint(folder) if folder else "none written"
            raise NonFiniteTraining(f"training stopped at step {self.global_step}: {longest} consecutive "
                                    f"non-finite steps; last checkpoint with usable weights: {last}")
