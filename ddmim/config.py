"""The pretraining run configuration's schema: one typed section per part, whose defaults are the original
DDMIM's values, each checking its own values (`check`); `Config` checks what spans sections. How presets,
overrides and types are read is `ddmim/config_engine.py`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ddmim.config_engine import (
    at_least,
    build_dataclass,
    check_sections,
    moved_keys,
    preset_names,  # noqa: F401 - the presets of this schema, read by its users from here
    preset_values,
    with_overrides,  # noqa: F401
)
from ddmim.errors import UserError

Kernels = Literal["auto", "triton", "torch"]
KERNEL_CHOICES = typing.get_args(Kernels)


@dataclass
class ModelConfig:
    method: str = "ddmim"  # ddmim (DDMIM and SimMIM, by their loss weights) | mae (needs the vit backbone)
    backbone: str = "swin_v2"  # a name in ddmim/models/factory.py's table (swin_v2 | vit)
    img_size: int = 224
    patch_size: int = 4
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1  # the original's (Microsoft Swin V2's default)
    head_dim: int = 1024  # the seed's `num_classes`: size of the linear head after pooling
    perceptual_tap: Literal["after_next_merge", "stage_output"] = "after_next_merge"  # see ddmim/models/swin.py
    fused_attention: bool = True  # SwinV2 window attention through scaled_dot_product_attention (same math)

    def check(self) -> None:
        for name in ("img_size", "patch_size", "embed_dim", "window_size"):
            at_least(f"model.{name}", getattr(self, name), 1)
        at_least("model.head_dim", self.head_dim, 0)
        if self.mlp_ratio <= 0 or not 0 <= self.drop_path_rate < 1:
            raise UserError(f"model.mlp_ratio must be positive and model.drop_path_rate in [0, 1), got "
                            f"{self.mlp_ratio} and {self.drop_path_rate}")
        if any(d < 1 for d in self.depths):
            raise UserError(f"model.depths must all be at least 1, got {self.depths}")
        n = len(self.depths)
        if n < 1 or len(self.num_heads) != n:
            raise UserError(f"model.depths and model.num_heads need one entry per stage, got {self.depths} and "
                            f"{self.num_heads}")
        reduction = self.patch_size * 2 ** (n - 1)
        if self.img_size % reduction:
            raise UserError(
                f"model.img_size={self.img_size} must be a positive multiple of patch_size * 2^(stages-1) = "
                f"{reduction} (each stage halves the {self.img_size // self.patch_size}-token grid)")
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2 ** i
            if heads <= 0 or dim % heads:
                raise UserError(f"stage {i}: width {dim} (model.embed_dim * 2^{i}) is not divisible by num_heads "
                                f"{heads}")


@dataclass
class DDMIMConfig:
    """model.method ddmim (DDMIM, and SimMIM by its loss weights): the projection head, the mask token and the
    loss's terms and weights (the fields of `DDMIMLoss`, by name); checked by the method (ddmim/models/factory.py)
    when it is the run's."""
    proj_hidden: int = 512
    proj_out: int = 512
    mask_token: bool = False  # a learned token replaces masked tokens entering stage 0 (SimMIM) instead of zeros
    perceptual_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 0.1])  # one per stage
    contrastive_weight: float = 1.0
    tau: float = 0.05
    recon_normalize: Literal["all", "masked"] = "all"  # all (seed) | masked (SimMIM)
    recon_beta: float = 1.0
    perceptual_beta: float = 1.0
    infonce_extra_logit: bool = True


@dataclass
class MAEConfig:
    """model.method mae: the light decoder (MAE's defaults) and its targets."""
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix: bool = True  # targets are per-patch normalised pixels (MAE's recommendation)


@dataclass
class MaskConfig:
    # ratios[0] is the base token-mask ratio; a stage i > 0 is masked iff ratios[i] > 0
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5, 0.0])
    exact_count: bool = False  # mask exactly round(ratio * units) per image (SimMIM) instead of independently
    patch: int = 1  # masking unit, in tokens per side (SimMIM: 8 = 32 x 32 pixels at patch size 4)


@dataclass
class EmaConfig:
    decay: float = 0.999
    every: int = 32
    # epoch_batches: every-th batch of each epoch (the original) | optimizer_steps
    count: Literal["epoch_batches", "optimizer_steps"] = "epoch_batches"
    first_copy: bool = True  # the first update copies the student (the original)
    teacher_mode: Literal["train", "eval"] = "train"  # train: follows the trainer, drop path included (original)

    def check(self) -> None:
        if not 0.0 <= self.decay <= 1.0 or self.every < 1:  # the training loop's schedule, for every method
            raise UserError(f"ema.decay must be in [0, 1] and ema.every >= 1, got {self.decay}, {self.every}")


@dataclass
class OptimConfig:
    lr: float = 5e-3
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_batch: int = 52  # lr is given for this global batch and scaled linearly to the real one (0: no scaling)
    schedule: Literal["step", "cosine"] = "step"  # step (StepLR, the original) | cosine (after linear warmup)
    step_size: int = 20  # step: period in epochs
    gamma: float = 0.1  # step: decay factor
    warmup_epochs: int = 0
    min_lr: float = 0.0  # cosine: the final rate

    def check(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.gamma <= 0:
            raise UserError(f"optim.lr and optim.gamma must be positive and optim.weight_decay not negative, got "
                            f"{self.lr}, {self.gamma} and {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"optim.betas needs two values in [0, 1), got {self.betas}")
        at_least("optim.step_size", self.step_size, 1)
        at_least("optim.warmup_epochs", self.warmup_epochs, 0)
        at_least("optim.lr_batch", self.lr_batch, 0)
        if self.min_lr < 0:
            raise UserError(f"optim.min_lr must not be negative, got {self.min_lr}")


@dataclass
class DataConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    val_crop_ratio: float = 0.875  # Resize(size / ratio) then CenterCrop(size)
    num_workers: int = 8  # loader worker processes (torchvision, FFCV) or threads (DALI)
    # quasi_random reads pages in runs: for data larger than RAM; one process
    ffcv_order: Literal["random", "quasi_random"] = "random"
    # the OS page cache holds the .beton, shared by every process and rank; false: FFCV's own cache, a private
    # copy of the whole file in each process
    ffcv_os_cache: bool = True
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # the crop resize of the folder and DALI loaders
    max_bad_samples: int = 1000  # samples that fail to decode (each skipped and named) before a run stops
    # imagefolder (train/<class>/*) | unlabeled (any tree of images) | list (a file of `path[,label]` lines)
    layout: Literal["auto", "imagefolder", "unlabeled", "list", "wds"] = "auto"
    val_fraction: float = 0.01  # held out for validation by a hash of the path, where the data has no val split
    val_path: str = ""  # --val-data: the validation images, a source of their own; the data's all train then

    def check(self) -> None:
        at_least("data.num_workers", self.num_workers, 0)
        at_least("data.max_bad_samples", self.max_bad_samples, 0)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise UserError(f"data.crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0 <= self.hflip <= 1 or not 0 < self.val_crop_ratio <= 1:
            raise UserError(f"data.hflip must be in [0, 1] and data.val_crop_ratio in (0, 1], got {self.hflip} "
                            f"and {self.val_crop_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise UserError("data.mean and data.std need 3 values each, with every std positive")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class EvalConfig:
    """Representation quality watched during pretraining (`ddmim/train/online_knn.py`)."""
    every_epochs: int = 0  # k-NN top-1 at every n-th epoch's validation and the one before training; 0: off
    k: int = 20
    temperature: float = 0.07

    def check(self) -> None:
        at_least("eval.every_epochs", self.every_epochs, 0)
        at_least("eval.k", self.k, 1)
        if self.temperature <= 0:
            raise UserError(f"eval.temperature must be positive, got {self.temperature}")


@dataclass
class TrainConfig:
    """What every training command shares."""
    epochs: int = 50
    batch_size: int = 52  # per device (per micro-batch under accumulation)
    # images per optimiser step over every device; 0: batch_size x devices x accumulate (ddmim/train/accumulation.py)
    global_batch: int = 0
    accumulate: int = 0  # micro-batches per optimiser step; 0: what global_batch implies (1 without it)
    seed: int = 0
    val_every: int = 1  # epochs between validations
    log_every: int = 50  # steps between logged training losses
    ckpt_every_steps: int = 0  # also write a checkpoint every N optimiser steps (0: once per epoch)
    keep_checkpoints: int = 3  # recent checkpoints kept (the best-by-validation one is kept besides)
    max_bad_steps: int = 20  # consecutive non-finite steps (skipped) before training stops
    report_every: int = 100  # steps between printed throughput lines (0: none)
    compile: bool = False  # torch.compile the model's forward (falls back to eager if compilation fails)
    compile_backend: str = "inductor"  # torch.compile's backend; aot_eager only traces (a quick check of the graphs)
    ddp_bucket_mb: float = 25.0  # data-parallel gradient buckets (MiB); compiled, the graph is split at each one

    def check(self) -> None:
        for name in ("epochs", "batch_size", "val_every", "log_every", "max_bad_steps"):
            at_least(f"train.{name}", getattr(self, name), 1)
        for name in ("ckpt_every_steps", "keep_checkpoints", "report_every", "global_batch", "accumulate"):
            at_least(f"train.{name}", getattr(self, name), 0)
        if not 0 <= self.seed < 2**32:
            raise UserError(f"train.seed must be in [0, 2^32), the range of the random generators it seeds, got "
                            f"{self.seed}")


@dataclass
class PretrainConfig(TrainConfig):
    kernels: Kernels = "auto"  # fused Triton kernels or the PyTorch references


class RunConfig(typing.Protocol):
    """What the shared run flow reads of a pretraining or fine-tuning config."""
    kind: typing.ClassVar[str]
    name: str
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]: ...

    @staticmethod
    def upgrade(values: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class Config:
    kind: typing.ClassVar[str] = "pretrain"  # the kind of checkpoint a run of this config writes
    name: str = "seed"
    model: ModelConfig = field(default_factory=ModelConfig)
    ddmim: DDMIMConfig = field(default_factory=DDMIMConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def upgrade(values: dict[str, Any]) -> dict[str, Any]:
        """Values written by an earlier ddmim (a checkpoint's, a run folder's config.yaml), in today's places."""
        return moved_keys(values, MOVED_KEYS)

    def check(self) -> None:
        """Each section's own checks, then the mask against the model's stages; a method's own checks
        (`model.method`, `model.backbone`) are the model factory's."""
        check_sections(self)
        n, grid = len(self.model.depths), self.model.img_size // self.model.patch_size
        if len(self.mask.ratios) != n or not all(0.0 <= r < 1.0 for r in self.mask.ratios):
            raise UserError(f"mask.ratios needs {n} values in [0, 1), got {self.mask.ratios}")
        if self.mask.patch < 1 or grid % self.mask.patch:
            raise UserError(f"mask.patch={self.mask.patch} must divide the token grid {grid}")


# (section, key) of an earlier ddmim -> where it is now (None: gone)
MOVED_KEYS: dict[tuple[str, str], tuple[str, str] | None] = {
    ("model", "proj_hidden"): ("ddmim", "proj_hidden"), ("model", "proj_out"): ("ddmim", "proj_out"),
    ("model", "mask_token"): ("ddmim", "mask_token"), ("model", "decoder_dim"): ("mae", "decoder_dim"),
    ("model", "decoder_depth"): ("mae", "decoder_depth"), ("model", "decoder_heads"): ("mae", "decoder_heads"),
    ("loss", "norm_pix"): ("mae", "norm_pix"),
    **{("loss", key): ("ddmim", key) for key in ("perceptual_weights", "contrastive_weight", "tau", "recon_normalize",
                                                 "recon_beta", "perceptual_beta", "infonce_extra_logit")},
}


def make_config(preset: str, overrides: list[str] | None = None, typed: dict[str, Any] | None = None) -> Config:
    return config_from_dict(preset_values(preset, overrides, typed=typed))


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuilds a Config saved with `Config.to_dict` (e.g. from a checkpoint's hyper-parameters, an earlier
    ddmim's included)."""
    cfg = build_dataclass(Config, Config.upgrade(values))
    cfg.check()
    return cfg
