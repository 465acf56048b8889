"""`ddmim train`: one pretraining run from a resolved config to a run folder with logs, checkpoints, summary."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import yaml

from ddmim.checkpoint_io import TMP_MARK, resume_checkpoint
from ddmim.config import Config
from ddmim.data import make_datamodule
from ddmim.errors import UserError
from ddmim.module import DDMIMModule
from ddmim.ops import check_kernels
from ddmim.trainer import Launch, build_trainer, is_launched_worker, resolve_launch

RUN_DIR_ENV = "DDMIM_RUN_DIR"  # hands rank 0's run folder to the processes Lightning launches for other ranks
RESUME_ENV = "DDMIM_RESUME_FROM"  # and the checkpoint rank 0 chose
RESUMABLE = ("model", "mask", "loss", "ema")  # what must not change when a run is resumed


def prepare_run_dir(out: Path) -> Path:
    """A fresh run folder; an existing non-empty one is never reused, so no earlier checkpoint is overwritten."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} already exists and is not empty; choose another --out "
                        "(or --resume auto to continue the run in it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder {out}: {exc.strerror}") from None
    return out


def remove_failed_start(out: Path) -> None:
    """A run that failed before its first step leaves nothing behind that would block the next start."""
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)


def resume_point(out: Path, cfg: Config) -> Path | None:
    """The checkpoint to continue from (None: the run never wrote one), after checking the run is this one."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"--resume auto: {out} is not a ddmim run folder (no config.yaml)")
    saved = yaml.safe_load(saved_path.read_text())
    current = cfg.to_dict()
    for section in RESUMABLE:
        if saved.get(section) != current[section]:
            raise UserError(f"--resume auto: {out} was made with preset '{saved.get('name')}' and a different "
                            f"'{section}' section than this run (preset '{cfg.name}')")
    for stale in (out / "checkpoints").glob(f"*{TMP_MARK}*"):
        stale.unlink()  # left by a writer that was killed; no writer runs while a run is being resumed
    return resume_checkpoint(out / "checkpoints")


def run_folder(out: Path, cfg: Config, resume: bool) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to start from. Only rank 0 checks and writes the folder; ranks that a
    launcher started use rank 0's folder (handed over in the environment by Lightning's launcher, or the
    same --out under torchrun and SLURM)."""
    if is_launched_worker():
        run_dir = Path(os.environ.get(RUN_DIR_ENV, out))
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            return run_dir, None
        chosen = os.environ.get(RESUME_ENV)
        return run_dir, (Path(chosen) if chosen else resume_checkpoint(run_dir / "checkpoints", announce=False))
    ckpt = resume_point(out, cfg) if resume else None
    if not resume:
        prepare_run_dir(out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.environ[RUN_DIR_ENV] = str(out.resolve())
    os.environ[RESUME_ENV] = str(ckpt.resolve()) if ckpt else ""
    return out, ckpt


def pretrain(cfg: Config, data_root: Path, out: Path, launch: Launch | None = None, *, data_format: str = "auto",
             resume: bool = False) -> dict:
    launch = resolve_launch(launch or Launch())
    check_kernels(cfg.train.kernels)
    datamodule = make_datamodule(data_root, cfg, data_format, channels_last=launch.channels_last)
    run_dir, ckpt = run_folder(Path(out), cfg, resume)

    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = DDMIMModule(cfg.to_dict(), channels_last=launch.channels_last)
    run = build_trainer(run_dir, cfg, launch, find_unused_parameters=not module.model.uses_teacher,
                        resume=resume)
    start = time.perf_counter()
    try:
        if ckpt is None:
            run.trainer.validate(module, datamodule=datamodule, verbose=False)  # the untrained model's loss
        else:
            print(f"resuming from {ckpt}")
        run.trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except BaseException:
        if not resume and run.trainer.global_step == 0 and not is_launched_worker():
            remove_failed_start(run_dir)
        raise
    if not run.val_history.steps or run.val_history.steps[-1] != run.trainer.global_step:
        run.trainer.validate(module, datamodule=datamodule, verbose=False)  # the final weights' loss

    losses = run.val_history.losses
    summary = {
        "preset": cfg.name,
        "data": str(data_root),
        "accelerator": launch.accelerator,
        "precision": launch.precision,
        "world_size": run.trainer.world_size,
        "channels_last": launch.channels_last,
        "resumed_from": str(ckpt) if ckpt else None,
        "steps": run.trainer.global_step,
        "epochs": run.trainer.current_epoch,
        "skipped_steps": module.skipped_steps,
        "wall_s": round(time.perf_counter() - start, 2),
        "train_images_per_s": round(run.throughput.images_per_s * run.trainer.world_size, 2),
        "data_wait_share": round(run.throughput.data_wait_share, 4),
        "val_loss_first": losses[0] if losses else None,
        "val_loss_last": losses[-1] if losses else None,
        "val_loss_history": losses,
        "run_dir": str(run_dir),
        "logs": str(run.log_dir / "metrics.csv"),
        "tensorboard": str(run_dir / "tensorboard"),
        "checkpoint_best": run.best.best_model_path,
        "checkpoint_last": run.checkpoint.last_model_path,
    }
    if run.trainer.is_global_zero:
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
        (f"  val loss        {first:.4f} before training -> {last:.4f} after{ratio}" if not summary["resumed_from"]
         else f"  val loss        {first:.4f} first after resuming -> {last:.4f} after{ratio}")
        if first is not None else "  val loss        not measured",
        f"  run folder      {summary['run_dir']}",
        f"  metrics (CSV)   {summary['logs']}",
        f"  tensorboard     tensorboard --logdir {summary['tensorboard']}",
        f"  checkpoints     {summary['checkpoint_last']} (last), {summary['checkpoint_best']} (best val loss)",
    ])
