"""Callbacks that measure and record a run: training throughput with data-wait share, the training-step rows
of the logs, and the validation-loss history."""
from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from ddmim.errors import UserError, one_line
from ddmim.machine import peak_flops, peak_memory_gib
from ddmim.train.accumulation import optimizer_stepped
from ddmim.train.checkpoint_files import save_step_checkpoint
from ddmim.train.launch import is_launched_worker
from ddmim.train.rank_notes import leave_note


def logged_step(trainer: pl.Trainer) -> int:
    """The step Lightning numbers its log rows with. It is private (`_batches_that_stepped` of the training epoch
    loop, checked against pytorch-lightning 2.6.6): read and set here only."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def align_logged_step(trainer: pl.Trainer) -> None:
    """Lightning adds one to its row counter when it restarts from an end-of-epoch checkpoint, so every later row
    was numbered one too high; without gradient accumulation it equals the optimiser step, which is restored
    exactly."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


def write_row(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """One row of the loggers now, at the step Lightning itself would use. Callbacks run before Lightning's
    checkpoint callbacks, so a row written here is on disk before a checkpoint of the same step: a run killed
    just after that checkpoint and resumed from it loses no row."""
    step = logged_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)
        logger.save()


class StepRows(pl.Callback):
    """Writes the module's `step_metrics` (set by its training_step) every `every` steps (Lightning's rule): under
    data parallelism their mean over the ranks (one all-reduce on a logged step), the global batch's."""

    def __init__(self, every: int):
        self.every = max(1, every)
        self._aligned = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._aligned:  # after Lightning's restart logic, which runs once the epoch loop starts
            align_logged_step(trainer)
            self._aligned = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = pl_module.step_metrics  # a TrainingModule
        if metrics and optimizer_stepped(trainer) and (logged_step(trainer) + 1) % self.every == 0:
            names = sorted(metrics)
            values = torch.stack([metrics[name].float() for name in names])
            if trainer.world_size > 1:
                torch.distributed.all_reduce(values)
                values /= trainer.world_size
            write_row(trainer, dict(zip(names, values.tolist())))


class ThroughputReport(pl.Callback):
    """Images/s of training steps (per device and in total) and the share of time spent waiting for data.

    The first `warmup` batches (worker start-up, allocator and kernel warm-up) are not counted. Time between
    an epoch's start and its first batch counts as data wait. Every `report_every` steps the figures since
    the previous report are printed (rank 0) and logged, with the peak device (or process) memory.

    The host waits for the device here only at a report, at the end of the warm-up and of each epoch: between
    two waits, the wall time of the steps is the device's, however far the host ran ahead. Data wait is the time
    the host spent waiting for the loader; while the device still works through queued steps, part of it
    costs the device nothing, so the share is an upper bound of the device's idle time for data.
    """

    def __init__(self, warmup: int = 5, report_every: int = 0):
        self.warmup = warmup
        self.report_every = report_every
        self.seen = 0
        self.images = 0  # on this rank
        self.wait_s = 0.0
        self.step_s = 0.0
        self._mark = 0.0
        self._window = (0, 0.0, 0.0)  # images, wait, step at the previous report
        self.flops_per_image: float | None = None

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
        stepped = optimizer_stepped(trainer)
        reporting = self.report_every and stepped and trainer.global_step % self.report_every == 0
        last = stepped and (trainer.global_step == trainer.max_steps or batch_idx + 1 == trainer.num_training_batches)
        if reporting or last or self.seen + 1 == self.warmup:
            self._sync(trainer)  # the warm-up's, a report's and an epoch's queued work: the time is the device's
        now = time.perf_counter()
        if self.seen >= self.warmup:
            self.step_s += now - self._mark
            self.images += len(batch[0])
        self.seen += 1
        self._mark = now
        if reporting and self.images:
            self._report(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        # counted once, so every report can give achieved FLOP/s and, on a known GPU, model FLOP utilisation
        self.flops_per_image = pl_module.flops_per_image() if self.report_every else None  # a TrainingModule

    def _report(self, trainer, pl_module) -> None:
        images, wait, step = self._window
        d_images, d_wait, d_step = self.images - images, self.wait_s - wait, self.step_s - step
        self._window = (self.images, self.wait_s, self.step_s)
        if d_wait + d_step <= 0:
            return
        per_device = d_images / (d_wait + d_step)
        stats = {"perf/images_per_s_device": per_device, "perf/images_per_s": per_device * trainer.world_size,
                 "perf/data_wait_share": d_wait / (d_wait + d_step),
                 "perf/peak_memory_gib": peak_memory_gib(trainer.strategy.root_device)}
        line = (f"step {trainer.global_step}: {stats['perf/images_per_s']:.1f} images/s ({per_device:.1f} per device), "
                f"data wait {100 * stats['perf/data_wait_share']:.1f}%, peak memory "
                f"{stats['perf/peak_memory_gib']:.2f} GiB")
        if self.flops_per_image:
            stats["perf/tflops_device"] = self.flops_per_image * per_device / 1e12
            line += f", {stats['perf/tflops_device']:.3f} TFLOP/s per device"
            peak = peak_flops(str(trainer.precision)) if trainer.strategy.root_device.type == "cuda" else None
            if peak:
                stats["perf/mfu"] = stats["perf/tflops_device"] * 1e12 / peak
                line += f" (MFU {100 * stats['perf/mfu']:.1f}%)"
        write_row(trainer, stats)
        pl_module.print(line)

    @property
    def images_per_s(self) -> float | None:
        """Per process (multiply by the world size for the total); None when no step came after the warm-up."""
        total = self.wait_s + self.step_s
        return self.images / total if total > 0 else None

    @property
    def data_wait_share(self) -> float | None:
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else None


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


class NoteOnStop(pl.Callback):
    """A rank other than 0 that stops on a bad input leaves its note (`rank_notes`) while the process group
    still lives: Lightning reports the exception here before its teardown."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, UserError) and is_launched_worker():
            leave_note(one_line(exception))


class FinalStepCheckpoint(pl.Callback):
    """With checkpoints every N steps, saves the run's last step when they miss it (--max-steps 25 with one
    every 10), as a step checkpoint with last.ckpt (which the summary names) linked to it. Saved where the periodic
    ones are, at the end of the training batch, so a resume from it is as exact. (With one per epoch, Lightning
    saves at --max-steps itself: the epoch ends there.)"""

    def __init__(self, folder: Path, every_steps: int):
        self.folder, self.every_steps = Path(folder), every_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not optimizer_stepped(trainer):
            return
        last_of_run = step == trainer.max_steps or (batch_idx + 1 == trainer.num_training_batches
                                                    and trainer.current_epoch + 1 == trainer.max_epochs)
        if self.every_steps and last_of_run and step % self.every_steps != 0:
            save_step_checkpoint(trainer, self.folder)
