"""Assembles the Lightning Trainer: loggers, checkpoints, measurement callbacks."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from ddmim.config import RunConfig
from ddmim.train.accumulation import accumulation
from ddmim.train.bad_sample_guard import BadSampleGuard
from ddmim.train.callbacks import FinalStepCheckpoint, NoteOnStop, StepRows, ThroughputReport, ValLossHistory
from ddmim.train.checkpoint_files import STEP_PREFIX, AtomicCheckpointIO, StepCheckpoints
from ddmim.train.history import HistoryCSVLogger, HistoryTensorBoardLogger
from ddmim.train.launch import Launch
from ddmim.train.preemption import Preemption, slurm_environment


class _NoTips(logging.Filter):
    """Drops Lightning's advertising ("💡 Tip: ... try installing litlogger"), printed at every Trainer's start;
    its other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


NO_TIPS = _NoTips()


def quiet_third_party_noise() -> None:
    """Silences what a ddmim user cannot act on; every other warning and message still shows."""
    # With ema.teacher_mode eval the EMA teacher stays in eval mode on purpose (no drop-path noise in the target).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning's pytree helper builds a LeafSpec, which torch deprecated.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(NO_TIPS)


@dataclass
class Run:
    trainer: pl.Trainer
    throughput: ThroughputReport
    val_history: ValLossHistory
    checkpoint: ModelCheckpoint  # the recent ones (and last.ckpt)
    best: ModelCheckpoint
    log_dir: Path


def strategy(launch: Launch, bucket_mb: float = 25.0):
    """DDP (every trained weight gets a gradient: the methods freeze what they skip) without broadcasting the
    buffers before each forward: the models' buffers are constants (position indices, window masks: 2.19 MiB a
    step for the seed preset's student and teacher). Gradients are all-reduced in buckets of `bucket_mb`."""
    if launch.strategy == "ddp" or launch.devices * launch.num_nodes > 1:
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(broadcast_buffers=False, bucket_cap_mb=bucket_mb)
    return launch.strategy


def build_trainer(run_dir: Path, cfg: RunConfig, launch: Launch, *, monitor: tuple[str, str] = ("val/loss", "min"),
                  resume: bool = False, extra_callbacks: tuple[pl.Callback, ...] = (),
                  preemption: Preemption | None = None) -> Run:
    """`cfg` needs `.train` (epochs, val_every, log_every, ckpt_every_steps, keep_checkpoints, report_every) and
    `.data.max_bad_samples`; `monitor` picks the best checkpoint, kept beside the `keep_checkpoints` most recent
    ones; `resume` continues the run folder's logs instead of starting them; `preemption`: the run's, listening
    since before the trainer existed."""
    quiet_third_party_noise()
    t = cfg.train
    throughput = ThroughputReport(report_every=t.report_every)
    history = ValLossHistory()
    folder = run_dir / "checkpoints"
    every = {"every_n_train_steps": t.ckpt_every_steps} if t.ckpt_every_steps else {"every_n_epochs": 1}
    # no version counter: a last.ckpt that Lightning's restored state does not name as its own (a stop's, a copied
    # run folder's) is replaced, not left stale beside a new last-v1.ckpt
    recent = StepCheckpoints(dirpath=folder, filename=STEP_PREFIX + "{step:08d}", auto_insert_metric_name=False,
                             save_top_k=-1, save_last="link", enable_version_counter=False,
                             **every)  # pruned by AtomicCheckpointIO
    best = ModelCheckpoint(dirpath=folder, filename=f"best-epoch{{epoch:03d}}-{monitor[0].replace('/', '_')}"
                           f"{{{monitor[0]}:.4f}}", auto_insert_metric_name=False, monitor=monitor[0],
                           mode=monitor[1], save_top_k=1,
                           # where the monitored value exists: a run stopped mid-epoch (--max-steps, a signal)
                           # ends its epoch unvalidated, and a save there warned of a missing val/loss
                           save_on_train_epoch_end=False)
    loggers = [
        HistoryCSVLogger(save_dir=run_dir, name="logs", version="", resume=resume),
        HistoryTensorBoardLogger(save_dir=run_dir, name="tensorboard", version="", default_hp_metric=False,
                                 resume=resume),
    ]
    trainer = pl.Trainer(
        accelerator=launch.accelerator,
        devices=launch.devices,
        num_nodes=launch.num_nodes,
        strategy=strategy(launch, t.ddp_bucket_mb),
        precision=launch.precision,
        max_epochs=t.epochs,
        max_steps=launch.max_steps,
        accumulate_grad_batches=accumulation(t.global_batch, t.batch_size, t.accumulate,
                                             launch.devices * launch.num_nodes),
        check_val_every_n_epoch=t.val_every,
        log_every_n_steps=t.log_every,
        num_sanity_val_steps=0,  # an explicit validation runs before training instead
        # no_grad, not inference_mode, for validation: FFCV's loader thread writes in place into batch
        # buffers allocated during validation, which inference tensors forbid (the loader then hangs)
        inference_mode=False,
        callbacks=[StepRows(t.log_every), throughput, BadSampleGuard(cfg.data.max_bad_samples, t.log_every), history,
                   recent, best, LearningRateMonitor(logging_interval="epoch"), NoteOnStop(),
                   FinalStepCheckpoint(folder, t.ckpt_every_steps), preemption or Preemption(folder), *extra_callbacks],
        plugins=[AtomicCheckpointIO(keep=t.keep_checkpoints), *slurm_environment()],
        logger=loggers,
        enable_progress_bar=launch.progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    return Run(trainer, throughput, history, recent, best, run_dir / "logs")
