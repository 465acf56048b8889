"""`ddmim train`: one pretraining run from a resolved config to a run folder with logs, checkpoints, summary."""
from __future__ import annotations

from pathlib import Path

from ddmim.config import Config
from ddmim.data import make_datamodule
from ddmim.models.factory import check_pretraining
from ddmim.models.kernels import check_kernels
from ddmim.train.compile import compile_line
from ddmim.train.launch import Launch, resolve_launch
from ddmim.train.online_knn import OnlineKnn
from ddmim.train.pretrain_module import DDMIMModule
from ddmim.train.run import FitPlan, run_fit


def pretrain(cfg: Config, data_root: Path, out: Path, launch: Launch | None = None, *, data_format: str = "auto",
             resume: bool = False) -> dict:
    check_pretraining(cfg)  # before the data set is listed, which takes minutes at ImageNet's size
    launch = resolve_launch(launch or Launch())
    check_kernels(cfg.train.kernels)
    e = cfg.eval
    knn = OnlineKnn(e.every_epochs, e.k, e.temperature) if e.every_epochs else None
    plan = FitPlan(
        cfg=cfg, data=data_root, out=out, launch=launch, resume=resume,
        datamodule=make_datamodule(data_root, cfg, data_format, channels_last=launch.channels_last),
        make_module=lambda: DDMIMModule(cfg, channels_last=launch.channels_last,
                                        cuda=launch.accelerator == "gpu"),
        validate_first=True,  # the untrained model's loss, to compare the trained one with
        callbacks=(knn,) if knn else ())

    def fields(run, module) -> dict:
        losses = run.val_history.losses
        return {"val_loss_first": losses[0] if losses else None, "val_loss_last": losses[-1] if losses else None,
                "val_loss_history": losses,
                "val_knn_top1_history": knn.history if knn else None, "val_knn_top1_steps": knn.steps if knn else None}

    return run_fit(plan, fields)


def format_summary(summary: dict) -> str:
    first, last = summary["val_loss_first"], summary["val_loss_last"]
    ratio = f" ({last / first:.2f}x)" if first and last is not None else ""
    return "\n".join([
        f"pretraining done: preset {summary['preset']}, {summary['steps']} steps in {summary['wall_s']:.0f} s "
        f"({summary['accelerator']}, precision {summary['precision']})",
        f"  global batch    {summary['global_batch']} images a step (micro-batches of "
        f"{summary['global_batch'] // summary['accumulate']} over {summary['world_size']} process(es), "
        f"{summary['accumulate']} a step)",
        (f"  throughput      {summary['train_images_per_s']:.1f} images/s "
         f"(data wait {100 * summary['data_wait_share']:.1f}% of step time)" if summary["train_images_per_s"]
         else f"  throughput      not measured: no step after the {summary['throughput_warmup_steps']} warm-up "
              f"steps"),
        (f"  val loss        {first:.4f} before training -> {last:.4f} after{ratio}" if not summary["resumed_from"]
         else f"  val loss        {first:.4f} first after resuming -> {last:.4f} after{ratio}")
        if first is not None else "  val loss        not measured",
        *([f"  k-NN top-1      {knn[0]:.1f}% first -> {knn[-1]:.1f}% last (val/knn_top1, "
            f"{len(knn)} measurements)"] if (knn := summary.get("val_knn_top1_history")) else []),
        *([compile_line(summary)] if summary["compile"] != "off" else []),
        f"  run folder      {summary['run_dir']}",
        f"  metrics (CSV)   {summary['logs']}",
        f"  tensorboard     tensorboard --logdir {summary['tensorboard']}",
        f"  checkpoints     {summary['checkpoint_last']} (last)"
        + (f", {summary['checkpoint_best']} (best val loss)" if summary["checkpoint_best"] else
           " (no validation at an epoch's end yet: no best)"),
    ])
