"""`ddmim train`: one pretraining run from a resolved config to a run folder with logs, checkpoints, summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import yaml

from ddmim.config import Config
from ddmim.data import make_datamodule
from ddmim.errors import UserError
from ddmim.module import DDMIMModule
from ddmim.ops import check_kernels
from ddmim.trainer import build_trainer, resolve_device


def prepare_run_dir(out: Path) -> Path:
    """A fresh run folder; an existing non-empty one is never reused, so no earlier checkpoint is overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder {out} already exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def pretrain(cfg: Config, data_root: Path, out: Path, *, data_format: str = "auto", accelerator: str = "auto",
             precision: str = "auto", channels_last: bool = False, max_steps: int = -1,
             progress_bar: bool = True) -> dict:
    accelerator, precision = resolve_device(accelerator, precision)
    check_kernels(cfg.train.kernels)
    datamodule = make_datamodule(data_root, cfg, data_format, channels_last=channels_last)
    run_dir = prepare_run_dir(out)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = DDMIMModule(cfg.to_dict(), channels_last=channels_last)
    run = build_trainer(run_dir, cfg, accelerator=accelerator, precision=precision, max_steps=max_steps,
                        progress_bar=progress_bar)
    start = time.perf_counter()
    run.trainer.validate(module, datamodule=datamodule, verbose=False)  # the untrained model's loss
    run.trainer.fit(module, datamodule=datamodule)
    if run.val_history.steps[-1] != run.trainer.global_step:
        run.trainer.validate(module, datamodule=datamodule, verbose=False)  # the final weights' loss

    losses = run.val_history.losses
    summary = {
        "preset": cfg.name,
        "data": str(data_root),
        "accelerator": accelerator,
        "precision": precision,
        "channels_last": channels_last,
        "steps": run.trainer.global_step,
        "epochs": run.trainer.current_epoch,
        "wall_s": round(time.perf_counter() - start, 2),
        "train_images_per_s": round(run.throughput.images_per_s, 2),
        "data_wait_share": round(run.throughput.data_wait_share, 4),
        "val_loss_first": losses[0] if losses else None,
        "val_loss_last": losses[-1] if losses else None,
        "val_loss_history": losses,
        "run_dir": str(run_dir),
        "logs": str(run.log_dir / "metrics.csv"),
        "tensorboard": str(run_dir / "tensorboard"),
        "checkpoint_best": run.checkpoint.best_model_path,
        "checkpoint_last": run.checkpoint.last_model_path,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    first, last = summary["val_loss_first"], summary["val_loss_last"]
    ratio = f" ({last / first:.2f}x)" if first and last is not None else ""
    return "\n".join([
        f"pretraining done: preset {summary['preset']}, {summary['steps']} steps in {summary['wall_s']:.0f} s "
        f"({summary['accelerator']}, precision {summary['precision']})",
        f"  throughput      {summary['train_images_per_s']:.1f} images/s "
        f"(data wait {100 * summary['data_wait_share']:.1f}% of step time)",
        f"  val loss        {first:.4f} before training -> {last:.4f} after{ratio}" if first is not None else
        "  val loss        not measured",
        f"  run folder      {summary['run_dir']}",
        f"  metrics (CSV)   {summary['logs']}",
        f"  tensorboard     tensorboard --logdir {summary['tensorboard']}",
        f"  checkpoints     {summary['checkpoint_last']} (last), {summary['checkpoint_best']} (best val loss)",
    ])
