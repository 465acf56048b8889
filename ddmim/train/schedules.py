"""Learning-rate rules shared by pretraining and fine-tuning: linear scaling with the global batch, and
timm's step or cosine schedules with linear warmup."""
from __future__ import annotations

from timm.scheduler import create_scheduler_v2


def scaled_lr(lr: float, lr_batch: int, global_batch: int) -> float:
    """The linear scaling rule: `lr` is given for a global batch of `lr_batch` images (0: use it as it is)."""
    return lr * global_batch / lr_batch if lr_batch else lr


def make_scheduler(optimizer, o, lr: float, epochs: int, steps_per_epoch: int):
    """timm's step or cosine schedule with linear warmup, advanced per optimiser update; it applies each
    group's layer-decay lr_scale. `o`: an optim config section (schedule, step_size, gamma, min_lr,
    warmup_epochs)."""
    scheduler, _ = create_scheduler_v2(optimizer, sched=o.schedule, num_epochs=epochs, decay_epochs=o.step_size,
                                       decay_rate=o.gamma, min_lr=o.min_lr, warmup_epochs=o.warmup_epochs,
                                       warmup_lr=lr * 1e-3, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


def step_scheduler(scheduler, global_step: int) -> None:
    """Lightning's hook: timm schedulers count optimiser updates; torch's count their own calls."""
    if hasattr(scheduler, "step_update"):
        scheduler.step_update(num_updates=global_step)
    else:
        scheduler.step()
