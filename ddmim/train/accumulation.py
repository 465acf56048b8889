"""One global batch whatever the device count: per-device batch x processes x gradient accumulation.

A run is defined by its global batch (`train.global_batch`; 0: `batch_size` x processes x `accumulate`). On
another device count the same global batch is reached by accumulating more or fewer micro-batches per optimiser
step. Everything that counts (learning-rate scaling, schedules, the EMA cadence, logging, checkpoints, the loaders'
resume positions) counts optimiser steps; a micro-batch's place in its step is `batch_idx % accumulate`, since
every epoch starts a new step (Lightning steps on an epoch's last batch even when it is short of `accumulate`).
"""
from __future__ import annotations

import pytorch_lightning as pl

from ddmim.errors import UserError


def accumulation(global_batch: int, batch_size: int, accumulate: int, processes: int) -> int:
    """The micro-batches per optimiser step (`accumulate`, or the count `global_batch` implies when it is 0)."""
    per_step = batch_size * processes
    if not global_batch:
        return max(1, accumulate)
    if global_batch % per_step:
        share = global_batch // processes if global_batch % processes == 0 else 0
        fits = [b for b in range(share, 0, -1) if share % b == 0][:4]
        raise UserError(f"train.global_batch={global_batch} is not reachable on {processes} process(es): "
                        f"train.batch_size={batch_size} x {processes} = {per_step} does not divide it"
                        + (f" (per-device batches that do: {', '.join(map(str, fits))}, ...)" if fits else
                           "; nor does any batch size, with this process count"))
    implied = global_batch // per_step
    if accumulate and accumulate != implied:
        raise UserError(f"train.accumulate={accumulate} and train.global_batch={global_batch} disagree: "
                        f"{batch_size} x {processes} process(es) x {accumulate} = {per_step * accumulate}; give one "
                        "of them")
    return implied


def global_batch(trainer: pl.Trainer | None, batch_size: int) -> int:
    """Images per optimiser step over every rank (the learning rate is scaled to it)."""
    if trainer is None:
        return batch_size
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


def optimizer_stepped(trainer: pl.Trainer) -> bool:
    """In on_train_batch_end: whether this batch ended an optimiser step (`trainer.global_step` counts it). The
    training epoch loop's rule, which is private (checked against pytorch-lightning 2.6.6)."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def rescale_epoch_progress(checkpoint: dict, before: int, now: int) -> None:
    """Lightning's count of the epoch's batches in a checkpoint written with `before` micro-batches a step, recounted
    for `now` (the same global batch on another process count), so that a resumed run ends each step on the right
    micro-batch. The loop's state layout is private (checked against pytorch-lightning 2.6.6); a checkpoint falls
    at a step's end, where `ready` counts whole steps (`completed` may lag it by the batch being saved)."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    for counts in (progress["current"], progress["total"]):
        ready = counts["ready"]
        for name, value in counts.items():
            counts[name] = ready // before * now - (ready - value)
