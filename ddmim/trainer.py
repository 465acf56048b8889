"""Assembles the Lightning Trainer: device and precision checks, loggers, checkpoints, measurement callbacks."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from ddmim.callbacks import ThroughputReport, ValLossHistory
from ddmim.config import Config
from ddmim.errors import UserError

# The EMA teacher is kept in eval mode on purpose (no drop-path noise in the target).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu")


def resolve_device(accelerator: str, precision: str) -> tuple[str, str]:
    """Turns 'auto' into concrete choices and refuses what this machine cannot run."""
    cuda = torch.cuda.is_available()
    if accelerator == "gpu" and not cuda:
        raise UserError("--accelerator gpu was asked for but no CUDA device is available")
    if accelerator == "auto":
        accelerator = "gpu" if cuda else "cpu"
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32"
    if precision == "16-mixed" and accelerator != "gpu":
        raise UserError("--precision 16-mixed needs a CUDA device; use 32 or bf16-mixed on the CPU")
    if precision == "bf16-mixed" and accelerator == "gpu" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16-mixed: this GPU does not support bf16; use 16-mixed or 32")
    return accelerator, precision


@dataclass
class Run:
    trainer: pl.Trainer
    throughput: ThroughputReport
    val_history: ValLossHistory
    checkpoint: ModelCheckpoint
    log_dir: Path


def build_trainer(run_dir: Path, cfg, *, accelerator: str, precision: str,
                  max_steps: int = -1, progress_bar: bool = True,
                  monitor: tuple[str, str] = ("val/loss", "min")) -> Run:
    """`cfg` needs `.train` (epochs, val_every, log_every); `monitor` picks the 'best' checkpoint."""
    throughput = ThroughputReport()
    history = ValLossHistory()
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename=f"epoch{{epoch:03d}}-{monitor[0].replace('/', '_')}{{{monitor[0]}:.4f}}",
        auto_insert_metric_name=False,
        monitor=monitor[0],
        mode=monitor[1],
        save_top_k=1,
        save_last=True,
    )
    loggers = [
        CSVLogger(save_dir=run_dir, name="logs", version=""),
        TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="", default_hp_metric=False),
    ]
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=cfg.train.epochs,
        max_steps=max_steps,
        check_val_every_n_epoch=cfg.train.val_every,
        log_every_n_steps=cfg.train.log_every,
        num_sanity_val_steps=0,  # an explicit validation runs before training instead
        # no_grad, not inference_mode, for validation: FFCV's loader thread writes in place into batch
        # buffers allocated during validation, which inference tensors forbid (the loader then hangs)
        inference_mode=False,
        callbacks=[throughput, history, checkpoint, LearningRateMonitor(logging_interval="epoch")],
        logger=loggers,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    return Run(trainer, throughput, history, checkpoint, run_dir / "logs")
