"""`ddmim finetune`: supervised training of a (pretrained or random) Swin V2 classifier, top-1/top-5.

Optimiser, layer-wise lr decay, schedules, mixup/cutmix and label smoothing come from timm.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

from ddmim.checkpoints import KIND_KEY, load_pretraining
from ddmim.data import make_datamodule
from ddmim.data.batch_augment import BatchRandAugment
from ddmim.errors import UserError
from ddmim.finetune_config import FinetuneConfig, finetune_config_from_dict
from ddmim.models.classifier import load_encoder_weights
from ddmim.models.factory import classifier
from ddmim.train.accumulation import global_batch
from ddmim.train.base_module import TrainingModule
from ddmim.train.compile import CompiledForward, data_parallel_wrapper
from ddmim.train.launch import Launch, resolve_launch
from ddmim.train.run import FitPlan, run_fit
from ddmim.train.schedules import make_scheduler, scaled_lr, step_scheduler


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().sum()


def make_optimizer(net, o, lr: float) -> torch.optim.Optimizer:
    """AdamW with timm's parameter groups: no weight decay on norms and biases, and with layer_decay < 1 an lr
    scale of layer_decay^(depth from the top) per group (one layer per transformer block, patch embedding
    below them, final norm and head at the top)."""
    return create_optimizer_v2(net, opt="adamw", lr=lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                               layer_decay=o.layer_decay if o.layer_decay < 1 else None,
                               fused=True)  # its found_inf skips a non-finite step (NonFiniteGuard)


class FinetuneModule(TrainingModule):
    def __init__(self, config: FinetuneConfig | dict[str, Any], num_classes: int, channels_last: bool = False,
                 batch_randaugment: bool = False):
        """`config`: the fine-tuning config (a dict: as saved in a checkpoint's hyper-parameters)."""
        cfg = config if isinstance(config, FinetuneConfig) else finetune_config_from_dict(config)
        super().__init__(cfg.train.max_bad_steps, cfg.train.log_every)
        self.save_hyperparameters({"config": cfg.to_dict(), "num_classes": num_classes,
                                   "channels_last": channels_last, "batch_randaugment": batch_randaugment})
        self.cfg = cfg
        a = self.cfg.augment
        self.net = classifier(self.cfg.model, num_classes, self.cfg.head.kind, self.cfg.head.hidden, a.drop_path)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.mixup = (Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                            num_classes=num_classes) if a.mixup > 0 or a.cutmix > 0 else None)
        self.randaugment = (BatchRandAugment(a.randaugment, self.cfg.data.mean, self.cfg.data.std)
                            if batch_randaugment and a.randaugment else None)
        self.soft_ce = SoftTargetCrossEntropy()
        self._val_sums = torch.zeros(3)
        # a plain object, not a module attribute: the network's weights stay registered once
        self.compiled = CompiledForward(self.net, self.cfg.train.compile_backend) if self.cfg.train.compile else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[KIND_KEY] = "finetune"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (self.compiled or self.net)(images)

    def on_train_start(self) -> None:
        if self.compiled is not None:
            self.compiled.trial(self._trial_loss, ddp=data_parallel_wrapper(self.trainer))

    def _trial_loss(self, forward) -> torch.Tensor:
        """The cross-entropy of one synthetic batch shaped like the training batches."""
        batch, size = self.cfg.train.batch_size, self.cfg.model.img_size
        images = torch.randn(batch, 3, size, size, device=self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.zeros(batch, dtype=torch.long, device=self.device)
        with self.trainer.precision_plugin.forward_context():
            return F.cross_entropy(forward(images), labels)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.randaugment is not None:
            images = self.randaugment(images)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            loss = self.soft_ce(self(images), targets)
        else:
            loss = F.cross_entropy(self(images), labels, label_smoothing=self.cfg.augment.label_smoothing)
        if (self.global_step + 1) % self.check_every == 0:  # Lightning reads a logged value on the host
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(labels), logger=False)
        self.record_step_row({"train/loss": loss.detach()}, batch_idx)  # written by the StepRows callback
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True)
        self._val_sums += torch.stack([topk_correct(logits, labels, 1), topk_correct(logits, labels, 5),
                                       torch.tensor(float(len(labels)), device=logits.device)])

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        self.log_dict({"val/top1": 100 * sums[0] / sums[2], "val/top5": 100 * sums[1] / sums[2]}, prog_bar=True)

    def configure_optimizers(self):
        o = self.cfg.optim
        lr = scaled_lr(o.lr, o.lr_batch, global_batch(self.trainer, self.cfg.train.batch_size))
        optimizer = make_optimizer(self.net, o, lr)
        steps = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        scheduler = make_scheduler(optimizer, o, lr, self.cfg.train.epochs, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        step_scheduler(scheduler, self.global_step)


def finetune(cfg: FinetuneConfig, data_root: Path, out: Path, launch: Launch | None = None, *,
             ckpt: Path | None = None, data_format: str = "auto", num_classes: int | None = None,
             resume: bool = False) -> dict:
    """Fine-tunes the encoder of pretraining checkpoint `ckpt` (or a random one); `cfg` is not changed: with a
    checkpoint, the backbone is the checkpoint's."""
    launch = resolve_launch(launch or Launch())
    state = None
    if ckpt is not None:
        pre_cfg, state = load_pretraining(ckpt)
        cfg = dataclasses.replace(cfg, model=pre_cfg.model)
    datamodule = make_datamodule(data_root, cfg, data_format, channels_last=launch.channels_last,
                                 randaugment=cfg.augment.randaugment, labels=True)
    classes = datamodule.num_classes
    if classes < 2:
        raise UserError(f"{data_root} has {classes} class; fine-tuning a classifier needs at least 2")
    if num_classes is not None and num_classes != classes:
        raise UserError(f"--num-classes {num_classes} disagrees with the data: {data_root} has {classes} classes")
    loaded = []

    def make_module() -> FinetuneModule:
        module = FinetuneModule(cfg, classes, channels_last=launch.channels_last,
                                batch_randaugment=not datamodule.applies_randaugment)
        if state is not None:
            loaded.append(load_encoder_weights(module.net, state, cfg.head.kind))
        return module

    plan = FitPlan(cfg=cfg, data=data_root, out=out, launch=launch, datamodule=datamodule, make_module=make_module,
                   resume=resume, monitor=("val/top1", "max"))

    def fields(run, module) -> dict:
        metrics = run.trainer.callback_metrics
        best = run.best.best_model_score
        return {"pretrained": str(ckpt) if ckpt else None, "encoder_tensors_loaded": sum(loaded),
                "num_classes": classes, "val_top1": float(metrics["val/top1"]),
                "val_top5": float(metrics["val/top5"]), "best_val_top1": float(best) if best is not None else None}

    return run_fit(plan, fields)
