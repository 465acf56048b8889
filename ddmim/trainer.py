"""Assembles the Lightning Trainer: launch checks, loggers, checkpoints, measurement callbacks."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy

from ddmim.callbacks import StepRows, ThroughputReport, ValLossHistory
from ddmim.checkpoint_io import STEP_PREFIX, AtomicCheckpointIO
from ddmim.data.bad_samples import BadSampleGuard
from ddmim.errors import UserError
from ddmim.history import HistoryCSVLogger, HistoryTensorBoardLogger

# The EMA teacher is kept in eval mode on purpose (no drop-path noise in the target).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu")
STRATEGIES = ("auto", "ddp")  # ddp_spawn is left out: the spawned ranks' results never reach the summary


@dataclass
class Launch:
    """Where and how a run executes; `resolve_launch` turns the 'auto' values into concrete ones."""
    accelerator: str = "auto"
    precision: str = "auto"
    devices: int = 1  # processes per node: GPUs, or CPU processes (gloo) on the CPU
    num_nodes: int = 1
    strategy: str = "auto"
    channels_last: bool = False
    max_steps: int = -1
    progress_bar: bool = True

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def resolve_launch(launch: Launch) -> Launch:
    """Concrete choices for 'auto', and one clear refusal for what this machine cannot run."""
    cuda = torch.cuda.is_available()
    accelerator, precision = launch.accelerator, launch.precision
    if accelerator == "gpu" and not cuda:
        raise UserError("--accelerator gpu was asked for but no CUDA device is available")
    if accelerator == "auto":
        accelerator = "gpu" if cuda else "cpu"
    if launch.devices < 1 or launch.num_nodes < 1:
        raise UserError("--devices and --num-nodes must be at least 1")
    if accelerator == "gpu" and launch.devices > torch.cuda.device_count():
        raise UserError(f"--devices {launch.devices} asks for more GPUs than this machine has "
                        f"({torch.cuda.device_count()})")
    if precision == "auto":
        precision = "32" if accelerator != "gpu" else ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed")
    if precision == "16-mixed" and accelerator != "gpu":
        raise UserError("--precision 16-mixed needs a CUDA device; use 32 or bf16-mixed on the CPU")
    if precision == "bf16-mixed" and accelerator == "gpu" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16-mixed: this GPU does not support bf16; use 16-mixed or 32")
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    return replace(launch, accelerator=accelerator, precision=precision)


def is_launched_worker() -> bool:
    """True in the processes a launcher started for ranks other than 0 (Lightning, torchrun, SLURM)."""
    return any(int(os.environ.get(name, "0")) > 0 for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


@dataclass
class Run:
    trainer: pl.Trainer
    throughput: ThroughputReport
    val_history: ValLossHistory
    checkpoint: ModelCheckpoint  # the recent ones (and last.ckpt)
    best: ModelCheckpoint
    log_dir: Path


def build_trainer(run_dir: Path, cfg, launch: Launch, *, monitor: tuple[str, str] = ("val/loss", "min"),
                  find_unused_parameters: bool = False, resume: bool = False) -> Run:
    """`cfg` needs `.train` (epochs, val_every, log_every, ckpt_every_steps, keep_checkpoints, report_every) and
    `.data.max_bad_samples`; `monitor` picks the best checkpoint, kept beside the `keep_checkpoints` most recent
    ones; `resume` continues the run folder's logs instead of starting them."""
    t = cfg.train
    throughput = ThroughputReport(report_every=getattr(t, "report_every", 0))
    history = ValLossHistory()
    folder = run_dir / "checkpoints"
    every = {"every_n_train_steps": t.ckpt_every_steps} if getattr(t, "ckpt_every_steps", 0) else {"every_n_epochs": 1}
    recent = ModelCheckpoint(dirpath=folder, filename=STEP_PREFIX + "{step:08d}", auto_insert_metric_name=False,
                             save_top_k=-1, save_last=True, **every)  # pruned by AtomicCheckpointIO
    best = ModelCheckpoint(dirpath=folder, filename=f"best-epoch{{epoch:03d}}-{monitor[0].replace('/', '_')}"
                           f"{{{monitor[0]}:.4f}}", auto_insert_metric_name=False, monitor=monitor[0],
                           mode=monitor[1], save_top_k=1)
    loggers = [
        HistoryCSVLogger(save_dir=run_dir, name="logs", version="", resume=resume),
        HistoryTensorBoardLogger(save_dir=run_dir, name="tensorboard", version="", default_hp_metric=False,
                                 resume=resume),
    ]
    strategy = launch.strategy
    if strategy == "ddp":
        strategy = DDPStrategy(find_unused_parameters=find_unused_parameters)
    trainer = pl.Trainer(
        accelerator=launch.accelerator,
        devices=launch.devices,
        num_nodes=launch.num_nodes,
        strategy=strategy,
        precision=launch.precision,
        max_epochs=t.epochs,
        max_steps=launch.max_steps,
        check_val_every_n_epoch=t.val_every,
        log_every_n_steps=t.log_every,
        num_sanity_val_steps=0,  # an explicit validation runs before training instead
        # no_grad, not inference_mode, for validation: FFCV's loader thread writes in place into batch
        # buffers allocated during validation, which inference tensors forbid (the loader then hangs)
        inference_mode=False,
        callbacks=[StepRows(t.log_every), throughput, BadSampleGuard(cfg.data.max_bad_samples), history, recent,
                   best, LearningRateMonitor(logging_interval="epoch")],
        plugins=[AtomicCheckpointIO(keep=getattr(t, "keep_checkpoints", 3))],
        logger=loggers,
        enable_progress_bar=launch.progress_bar,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    return Run(trainer, throughput, history, recent, best, run_dir / "logs")
