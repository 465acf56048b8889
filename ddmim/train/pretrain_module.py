"""The Lightning wrapper of DDMIM: steps, logging, EMA schedule, optimiser and LR schedule."""
from __future__ import annotations

from typing import Any

import torch

from ddmim.checkpoints import KIND_KEY
from ddmim.config import Config, config_from_dict
from ddmim.errors import UserError
from ddmim.models.factory import pretraining_model
from ddmim.models.kernels import resolve_kernels
from ddmim.train.accumulation import global_batch
from ddmim.train.base_module import TrainingModule
from ddmim.train.checkpoint_files import every_rank_rng_state, restore_rng_state
from ddmim.train.compile import CompiledForward, data_parallel_wrapper
from ddmim.train.schedules import make_scheduler, scaled_lr, step_scheduler

VAL_STREAM = 7919  # validation masks use seed + VAL_STREAM, apart from the training masks


class DDMIMModule(TrainingModule):
    def __init__(self, config: Config | dict[str, Any], channels_last: bool = False, cuda: bool = False):
        """`config`: the run config (a dict: as saved in a checkpoint's hyper-parameters, which
        `load_from_checkpoint` passes back); `cuda`: the run is on CUDA, where `train.kernels: auto` picks the
        Triton kernels."""
        cfg = config if isinstance(config, Config) else config_from_dict(config)
        super().__init__(cfg.train.max_bad_steps, cfg.train.log_every)
        self.cfg = cfg
        self.save_hyperparameters({"config": self.cfg.to_dict(), "channels_last": channels_last, "cuda": cuda})
        self.channels_last = channels_last
        self.model = pretraining_model(self.cfg, kernels=resolve_kernels(self.cfg.train.kernels, cuda=cuda))
        if channels_last:
            self.model.to_channels_last()
        self.ema_updates = 0
        # a plain object, not a module attribute: the model's weights stay registered once
        self.compiled = CompiledForward(self.model, self.cfg.train.compile_backend) if self.cfg.train.compile else None

    def on_train_start(self) -> None:
        if self.compiled is not None:
            self.compiled.trial(self._trial_loss, ddp=data_parallel_wrapper(self.trainer))

    def _trial_loss(self, forward) -> torch.Tensor:
        """The loss of one synthetic batch shaped like the training batches, as training_step computes it."""
        batch, size = self.cfg.train.batch_size, self.cfg.model.img_size
        images = self._images(torch.randn(batch, 3, size, size, device=self.device))
        base, masks = self.model.draw_masks(batch, device=self.device, seed=self.cfg.train.seed)
        with self.trainer.precision_plugin.forward_context():
            return forward(images, base, masks, gather=self._gather)["loss"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[KIND_KEY] = "pretrain"
        checkpoint["rng"] = every_rank_rng_state()
        checkpoint["ema_updates"] = self.ema_updates

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("optimizer_states") or [{"param_groups": []}]
        count = sum(len(group["params"]) for group in saved[0]["param_groups"])
        trained = sum(1 for p in self.model.parameters() if p.requires_grad)
        if count and count != trained:  # SimMIM and MAE checkpoints of before the teacher-free SimMIM
            raise UserError(f"this checkpoint's optimiser holds {count} tensors and this {self.cfg.model.method} "
                            f"model trains {trained}: it was written by an earlier ddmim and cannot be resumed "
                            "(export, fine-tuning and evaluation still read it)")
        if "rng" in checkpoint:
            restore_rng_state(checkpoint["rng"], self.global_rank)
        self.ema_updates = checkpoint.get("ema_updates", 1)

    def flops_per_image(self, batch: int = 2) -> float | None:
        """FLOPs of one training image (forward and backward; Lightning's counter), for the throughput reports."""
        from lightning_fabric.utilities.throughput import measure_flops

        size = self.cfg.model.img_size
        generator = torch.Generator(device=self.device).manual_seed(0)  # the global random stream stays as it is
        images = torch.randn(batch, 3, size, size, device=self.device, generator=generator)
        base, masks = self.model.draw_masks(batch, device=self.device)
        flops = measure_flops(self.model, lambda: self.model(images, base, masks)["loss"], loss_fn=lambda loss: loss)
        self.model.zero_grad(set_to_none=True)
        return flops / batch


    def _gather(self, z_t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Negatives from every data-parallel rank; z_t is a stop-gradient target, so no gradient to route.
        torch.distributed's collective, which dynamo traces into the compiled graph; Lightning's all_gather
        goes through torch.distributed.nn, which torch.compile refuses: the whole forward fell back to eager
        and dynamo compiled its inner frames one by one."""
        world = 1 if self.trainer is None else self.trainer.world_size
        if world == 1:
            return z_t, 0
        gathered = z_t.new_empty(world * z_t.shape[0], *z_t.shape[1:])
        torch.distributed.all_gather_into_tensor(gathered, z_t.contiguous())
        return gathered, self.global_rank * z_t.shape[0]

    def _images(self, batch) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _log_losses(self, prefix: str, losses: dict[str, torch.Tensor], batch_size: int,
                    batch_idx: int | None) -> None:
        """`batch_idx`: a training batch's (the loggers get its rows from the StepRows callback, Lightning shows
        the progress bar); None: validation's."""
        if batch_idx is not None:
            self.record_step_row({f"{prefix}/{name}": value.detach() for name, value in losses.items()}, batch_idx)
            if (self.global_step + 1) % self.check_every == 0:  # Lightning reads a logged value on the host
                self.log(f"{prefix}/loss", losses["loss"].detach(), batch_size=batch_size, prog_bar=True,
                         logger=False)
            return
        for name, value in losses.items():
            self.log(f"{prefix}/{name}", value.detach(), batch_size=batch_size, on_epoch=True, prog_bar=name == "loss",
                     sync_dist=True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = self._images(batch)
        # one mask stream per micro-batch of the global batch, numbered by rank and micro-step: the same draws
        # wherever (devices x accumulation) a step's micro-batches run
        accumulate = self.trainer.accumulate_grad_batches
        index = ((self.global_step * self.trainer.world_size + self.global_rank) * accumulate
                 + batch_idx % accumulate)
        base, masks = self.model.draw_masks(images.shape[0], device=images.device, seed=self.cfg.train.seed,
                                            index=index)
        forward = self.compiled or self.model
        losses = forward(images, base, masks, gather=self._gather)
        self._log_losses("train", losses, images.shape[0], batch_idx)
        return losses["loss"]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # here, not in on_train_batch_end: Lightning runs the callbacks' on_train_batch_end (the step
        # checkpoints) before the module's, so a checkpoint would miss its own step's teacher update
        self.ema_step(batch_idx // self.trainer.accumulate_grad_batches)  # batch_idx counts micro-batches

    def ema_step(self, epoch_step: int) -> None:
        """`epoch_step`: the optimiser step's index in its epoch."""
        ema = self.cfg.ema
        # the original counts the batches (steps) of each epoch (updating after batch 0, 32, ...); the alternative
        # counts optimiser steps over the run (this step's included: Lightning advances global_step after it)
        counter = epoch_step if ema.count == "epoch_batches" else self.global_step + 1
        if counter % ema.every == 0:
            copy = ema.first_copy and self.ema_updates == 0
            self.model.update_teacher(0.0 if copy else ema.decay, skip=self.step_skipped)
            self.ema_updates += 1

    def validation_step(self, batch, batch_idx: int) -> None:
        images = self._images(batch)
        # the same masks at every validation (a stream of their own), so validation losses of different
        # epochs are comparable
        index = batch_idx * self.trainer.world_size + self.global_rank
        seed = self.cfg.train.seed + VAL_STREAM
        base, masks = self.model.draw_masks(images.shape[0], device=images.device, seed=seed, index=index)
        losses = self.model(images, base, masks, gather=self._gather)
        self._log_losses("val", losses, images.shape[0], None)

    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = scaled_lr(o.lr, o.lr_batch, global_batch(self._trainer, self.cfg.train.batch_size))
        optimizer = torch.optim.AdamW(params, lr=lr,
                                      weight_decay=o.weight_decay, betas=tuple(o.betas),
                                      fused=True)  # on the CPU too: its found_inf skips a non-finite step
        if o.schedule == "step" and not o.warmup_epochs:  # the original: torch's StepLR, stepped per epoch
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        steps = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        scheduler = make_scheduler(optimizer, o, optimizer.param_groups[0]["lr"], self.cfg.train.epochs, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        step_scheduler(scheduler, self.global_step)
