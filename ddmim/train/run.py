"""The one run flow every training command uses: run folder, config.yaml, seeding, trainer, fit, final
validation, and a summary that rank 0 writes. A command gives it only its module, data module and fields."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl

from ddmim.atomic import write_text
from ddmim.config import RunConfig
from ddmim.errors import UserError, one_line
from ddmim.train.accumulation import global_batch
from ddmim.train.checkpoint_files import LAST
from ddmim.train.compile import compile_report
from ddmim.train.curves import write_curves
from ddmim.train.launch import Launch, is_launched_worker
from ddmim.train.preemption import Preemption
from ddmim.train.run_folder import open_run_folder, remove_failed_start
from ddmim.train.trainer import Run, build_trainer


@dataclass
class FitPlan:
    cfg: RunConfig
    data: Path
    out: Path
    launch: Launch  # resolved
    datamodule: pl.LightningDataModule
    make_module: Callable[[], pl.LightningModule]  # called after seeding
    resume: bool = False
    monitor: tuple[str, str] = ("val/loss", "min")  # picks the best checkpoint
    validate_first: bool = False  # measure the untrained model before a fresh run
    callbacks: tuple[pl.Callback, ...] = ()  # the command's own, beside the shared ones


def throughput_fields(run: Run) -> dict:
    """Training images/s of all ranks and the data-wait share; None (JSON null) for a run too short to measure."""
    per_rank, wait = run.throughput.images_per_s, run.throughput.data_wait_share
    return {"train_images_per_s": None if per_rank is None else round(per_rank * run.trainer.world_size, 2),
            "data_wait_share": None if wait is None else round(wait, 4),
            "throughput_warmup_steps": run.throughput.warmup}


def run_fit(plan: FitPlan, summary_fields: Callable[[Run, pl.LightningModule], dict]) -> dict:
    config = Path(plan.out) / "config.yaml"
    # the run's values, put back if this resume is refused once its checkpoint is read (another global batch)
    before = config.read_text() if plan.resume and config.is_file() and not is_launched_worker() else None
    run_dir, ckpt, lock = open_run_folder(Path(plan.out), plan.cfg, plan.resume)
    try:
        return _fit(plan, summary_fields, run_dir, ckpt, before)
    finally:
        if lock is not None:
            lock.release()


def _fit(plan: FitPlan, summary_fields: Callable[[Run, pl.LightningModule], dict], run_dir: Path,
         ckpt: Path | None, config_before: str | None) -> dict:
    pl.seed_everything(plan.cfg.train.seed, workers=True, verbose=False)
    run, preemption = None, Preemption(run_dir / "checkpoints")
    try:
        with preemption.listening():
            module = plan.make_module()
            run = build_trainer(run_dir, plan.cfg, plan.launch, monitor=plan.monitor, resume=plan.resume,
                                extra_callbacks=plan.callbacks, preemption=preemption)
            start = time.perf_counter()
            if ckpt is not None:
                print(f"resuming from {ckpt}")
            elif plan.validate_first:
                run.trainer.validate(module, datamodule=plan.datamodule, verbose=False)
            run.trainer.fit(module, datamodule=plan.datamodule, ckpt_path=ckpt)
    except BaseException as exc:
        _refuse_gone_folder(run_dir, exc)
        if (run is None or run.trainer.global_step == 0) and not is_launched_worker():
            if not plan.resume:
                remove_failed_start(run_dir)
            elif config_before is not None and (run_dir / "config.yaml").is_file():
                write_text(run_dir / "config.yaml", config_before)
        raise
    try:
        return _finish(plan, summary_fields, run, module, run_dir, ckpt, start)
    except Exception as exc:
        _refuse_gone_folder(run_dir, exc)
        raise


def _refuse_gone_folder(run_dir: Path, exc: BaseException) -> None:
    """One line for a run folder deleted or moved during the run, which Lightning's loggers report in their
    own ways (RuntimeError, OSError). It is known gone by its config.yaml: the run's writers may have made the
    folder again."""
    if isinstance(exc, Exception) and not (run_dir / "config.yaml").is_file():
        raise UserError(f"the run folder {run_dir} was deleted or moved during the run ({type(exc).__name__}: "
                        f"{one_line(exc)[:160]}); restore it and --resume auto, or start the run again") from None


def _finish(plan: FitPlan, summary_fields: Callable[[Run, pl.LightningModule], dict], run: Run,
            module: pl.LightningModule, run_dir: Path, ckpt: Path | None, start: float) -> dict:
    """The final validation and the summary."""
    if not run.val_history.steps or run.val_history.steps[-1] != run.trainer.global_step:
        run.trainer.validate(module, datamodule=plan.datamodule, verbose=False)  # the final weights
    summary = {
        "preset": plan.cfg.name,
        "data": str(plan.data),
        "accelerator": plan.launch.accelerator,
        "precision": plan.launch.precision,
        "world_size": run.trainer.world_size,
        "accumulate": run.trainer.accumulate_grad_batches,
        "global_batch": global_batch(run.trainer, plan.cfg.train.batch_size),
        "channels_last": plan.launch.channels_last,
        "resumed_from": str(ckpt) if ckpt else None,
        "steps": run.trainer.global_step,
        "epochs": run.trainer.current_epoch,
        "skipped_steps": module.skipped_steps,
        **compile_report(module.compiled),
        "wall_s": round(time.perf_counter() - start, 2),
        **throughput_fields(run),
        **summary_fields(run, module),
        "run_dir": str(run_dir),
        "logs": str(run.log_dir / "metrics.csv"),
        "tensorboard": str(run_dir / "tensorboard"),
        "checkpoint_best": _in_folder(run.best.best_model_path, run_dir / "checkpoints"),
        "checkpoint_last": _in_folder(run.checkpoint.last_model_path, run_dir / "checkpoints", LAST),
    }
    if run.trainer.is_global_zero:
        summary["curves"] = _curves(run.log_dir / "metrics.csv", run_dir / "curves.png")
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _in_folder(path: str, folder: Path, otherwise: str = "") -> str:
    """The file of this run's checkpoint folder that `path` (or, for none, `otherwise`) names: Lightning restores
    the best path as the checkpoint recorded it (in a copied or moved run folder, the original's), and none for
    the last in such a folder when the resumed run saved nothing (its steps were all done)."""
    name = Path(path or otherwise).name
    return str(folder / name) if name and (folder / name).is_file() else path


def _curves(metrics: Path, out: Path) -> str | None:
    """The run's curves picture; a run that trained is not failed for a picture it could not draw."""
    try:
        written = write_curves(metrics, out) if metrics.is_file() else None
    except (OSError, ValueError) as exc:
        print(f"ddmim: no {out.name}: {exc}")
        return None
    return str(written) if written else None
