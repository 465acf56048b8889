"""Typed run configuration: YAML presets shipped in the package plus `section.key=value` overrides.

Every field is declared here with its type, so an unknown key or a value of the wrong type is
caught when the configuration is built, long before a model is constructed.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from ddmim.errors import UserError

KERNEL_CHOICES = ("auto", "triton", "torch")


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
    perceptual_tap: str = "after_next_merge"  # or stage_output; see ddmim/models/swin.py
    fused_attention: bool = True  # SwinV2 window attention through scaled_dot_product_attention (same math)


@dataclass
class DDMIMConfig:
    """model.method ddmim (DDMIM, and SimMIM by its loss weights): the projection head and the mask token."""
    proj_hidden: int = 512
    proj_out: int = 512
    mask_token: bool = False  # a learned token replaces masked tokens entering stage 0 (SimMIM) instead of zeros


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
class LossConfig:
    """model.method ddmim's loss terms and weights."""
    perceptual_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 0.1])
    contrastive_weight: float = 1.0
    tau: float = 0.05
    recon_normalize: str = "all"  # "all" (seed) or "masked" (SimMIM)
    recon_beta: float = 1.0
    perceptual_beta: float = 1.0
    infonce_extra_logit: bool = True


@dataclass
class EmaConfig:
    decay: float = 0.999
    every: int = 32
    count: str = "epoch_batches"  # epoch_batches: every-th batch of each epoch (the original) | optimizer_steps
    first_copy: bool = True  # the first update copies the student (the original)
    teacher_mode: str = "train"  # train: follows the trainer, drop path included (the original) | eval: fixed


@dataclass
class OptimConfig:
    lr: float = 5e-3
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_batch: int = 52  # lr is given for this global batch and scaled linearly to the real one (0: no scaling)
    schedule: str = "step"  # step (StepLR, the original) | cosine (after linear warmup)
    step_size: int = 20  # step: period in epochs
    gamma: float = 0.1  # step: decay factor
    warmup_epochs: int = 0
    min_lr: float = 0.0  # cosine: the final rate


@dataclass
class DataConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    val_crop_ratio: float = 0.875  # Resize(size / ratio) then CenterCrop(size)
    num_workers: int = 8  # loader worker processes (torchvision, FFCV) or threads (DALI)
    ffcv_order: str = "random"  # random | quasi_random (reads pages in runs: for data larger than RAM; one process)
    # the OS page cache holds the .beton, shared by every process and rank; false: FFCV's own cache, a private
    # copy of the whole file in each process
    ffcv_os_cache: bool = True
    interpolation: str = "bilinear"  # bilinear | bicubic: the crop resize of the folder and DALI loaders
    max_bad_samples: int = 1000  # samples that fail to decode (each skipped and named) before a run stops


@dataclass
class TrainConfig:
    """What every training command shares."""
    epochs: int = 50
    batch_size: int = 52
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


@dataclass
class PretrainConfig(TrainConfig):
    kernels: str = "auto"  # auto | triton | torch: fused Triton kernels or the PyTorch references


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
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: PretrainConfig = field(default_factory=PretrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def upgrade(values: dict[str, Any]) -> dict[str, Any]:
        """Values written by an earlier ddmim (a checkpoint's, a run folder's config.yaml), in today's places."""
        return moved_keys(values, MOVED_KEYS)


# (section, key) of an earlier ddmim -> where it is now (None: gone)
MOVED_KEYS: dict[tuple[str, str], tuple[str, str] | None] = {
    ("model", "proj_hidden"): ("ddmim", "proj_hidden"), ("model", "proj_out"): ("ddmim", "proj_out"),
    ("model", "mask_token"): ("ddmim", "mask_token"), ("model", "decoder_dim"): ("mae", "decoder_dim"),
    ("model", "decoder_depth"): ("mae", "decoder_depth"), ("model", "decoder_heads"): ("mae", "decoder_heads"),
    ("loss", "norm_pix"): ("mae", "norm_pix"),
}


def moved_keys(values: dict[str, Any], moves: dict[tuple[str, str], tuple[str, str] | None]) -> dict[str, Any]:
    """`values` with every old key of `moves` put at its new place or dropped. A moved value wins over one
    already there: old and new keys meet only where an old-style `--set` overrides a preset."""
    out = {name: dict(section) if isinstance(section, dict) else section for name, section in values.items()}
    for (section, key), target in moves.items():
        if isinstance(out.get(section), dict) and key in out[section]:
            value = out[section].pop(key)
            if target is not None:
                new = out.setdefault(target[0], {})
                if isinstance(new, dict):
                    new[target[1]] = value
    return out


PRESET_PACKAGES = {"pretrain": "ddmim.presets", "finetune": "ddmim.presets.finetune"}
# `_name.yaml` in ddmim/presets: a block that presets of either kind compose (`base: [_name, ...]`), not a preset
FRAGMENT_PREFIX = "_"


def preset_names(kind: str = "pretrain") -> list[str]:
    folder = resources.files(PRESET_PACKAGES[kind])
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")
                  and not p.name.startswith(FRAGMENT_PREFIX))


def _preset_file(name: str, kind: str, chain: tuple[str, ...]) -> dict[str, Any]:
    """A preset's own values merged over those of its `base` presets (in order: a later one wins)."""
    if name in chain:
        raise UserError(f"preset bases form a circle: {' -> '.join((*chain, name))}")
    package = PRESET_PACKAGES["pretrain" if name.startswith(FRAGMENT_PREFIX) else kind]
    path = resources.files(package).joinpath(f"{name}.yaml")
    if not path.is_file():
        raise UserError(f"preset {chain[-1] if chain else name} names base '{name}', which does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"preset file {path} is not YAML text: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:160]}") from None
    if not isinstance(values, dict):
        raise UserError(f"preset file {path} holds a {type(values).__name__}, not sections of settings "
                        f"(model:, train:, ...)")
    bases = values.pop("base", [])
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not all(isinstance(base, str) for base in names):
        raise UserError(f"preset file {path}: base must name presets (a name or a list of names), got {bases!r}")
    merged: dict[str, Any] = {}
    for base in names:
        merged = _merge(merged, _preset_file(base, kind, (*chain, name)))
    return _merge(merged, values)


def preset_values(name: str, overrides: list[str] | None = None, kind: str = "pretrain",
                  typed: dict[str, Any] | None = None) -> dict[str, Any]:
    """A preset's values (its bases' included) with `section.key=value` overrides (text, read as YAML) and
    `typed` ones ({"section.key": value}, from typed command-line options) merged in; not yet checked."""
    if name not in preset_names(kind):
        raise UserError(f"unknown {kind} preset '{name}'; available: {', '.join(preset_names(kind))}")
    values = _preset_file(name, kind, ())
    values["name"] = name
    return with_overrides(values, overrides, typed)


def with_overrides(values: dict[str, Any], overrides: list[str] | None = None,
                   typed: dict[str, Any] | None = None) -> dict[str, Any]:
    for text in overrides or []:
        values = _merge(values, parse_override(text))
    for key, value in (typed or {}).items():
        values = _merge(values, nested(key, value))
    return values


def nested(key: str, value: Any) -> dict[str, Any]:
    """'optim.lr', 1e-3 -> {"optim": {"lr": 0.001}}."""
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"option key '{key}' has an empty part")
    for part in reversed(parts):
        value = {part: value}
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value}")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise UserError(f"{where} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Builds a (nested) config dataclass from plain values, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown option {where}{unknown[0]}; known in this section: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`optim.lr=1e-3` -> {"optim": {"lr": 0.001}}; the value is read as YAML (lists: `[1,2]`)."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"override '{text}': cannot read value '{raw}'") from None
    return nested(key, value)


def make_config(preset: str, overrides: list[str] | None = None, typed: dict[str, Any] | None = None) -> Config:
    return config_from_dict(preset_values(preset, overrides, typed=typed))


def at_least(where: str, value, low) -> None:
    if value < low:
        raise UserError(f"{where} must be at least {low}, got {value}")


def validate_model(m: ModelConfig) -> None:
    for name in ("img_size", "patch_size", "embed_dim", "window_size"):
        at_least(f"model.{name}", getattr(m, name), 1)
    at_least("model.head_dim", m.head_dim, 0)
    if m.mlp_ratio <= 0 or not 0 <= m.drop_path_rate < 1:
        raise UserError(f"model.mlp_ratio must be positive and model.drop_path_rate in [0, 1), got {m.mlp_ratio} "
                        f"and {m.drop_path_rate}")
    if any(d < 1 for d in m.depths):
        raise UserError(f"model.depths must all be at least 1, got {m.depths}")
    n = len(m.depths)
    if n < 1 or len(m.num_heads) != n:
        raise UserError(f"model.depths and model.num_heads need one entry per stage, got {m.depths} and {m.num_heads}")
    reduction = m.patch_size * 2 ** (n - 1)
    if m.img_size <= 0 or m.patch_size <= 0 or m.img_size % reduction:
        raise UserError(
            f"model.img_size={m.img_size} must be a positive multiple of patch_size * 2^(stages-1) = {reduction} "
            f"(each stage halves the {m.img_size // max(m.patch_size, 1)}-token grid)")
    for i, heads in enumerate(m.num_heads):
        dim = m.embed_dim * 2 ** i
        if heads <= 0 or dim % heads:
            raise UserError(f"stage {i}: width {dim} (model.embed_dim * 2^{i}) is not divisible by num_heads {heads}")


def validate_data_and_train(data: DataConfig, train: TrainConfig) -> None:
    """The checks the pretraining and fine-tuning configs share."""
    at_least("data.num_workers", data.num_workers, 0)
    at_least("data.max_bad_samples", data.max_bad_samples, 0)
    if data.interpolation not in ("bilinear", "bicubic"):
        raise UserError(f"data.interpolation must be bilinear or bicubic, got '{data.interpolation}'")
    if data.ffcv_order not in ("random", "quasi_random"):
        raise UserError(f"data.ffcv_order must be random or quasi_random, got '{data.ffcv_order}'")
    if len(data.crop_scale) != 2 or not 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1:
        raise UserError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {data.crop_scale}")
    if len(data.crop_ratio) != 2 or not 0 < data.crop_ratio[0] <= data.crop_ratio[1]:
        raise UserError(f"data.crop_ratio must satisfy 0 < min <= max, got {data.crop_ratio}")
    if not 0 <= data.hflip <= 1 or not 0 < data.val_crop_ratio <= 1:
        raise UserError(f"data.hflip must be in [0, 1] and data.val_crop_ratio in (0, 1], got {data.hflip} and "
                        f"{data.val_crop_ratio}")
    if len(data.mean) != 3 or len(data.std) != 3 or any(s <= 0 for s in data.std):
        raise UserError("data.mean and data.std need 3 values each, with every std positive")
    for name in ("epochs", "val_every", "log_every", "max_bad_steps"):
        at_least(f"train.{name}", getattr(train, name), 1)
    for name in ("ckpt_every_steps", "keep_checkpoints", "report_every"):
        at_least(f"train.{name}", getattr(train, name), 0)
    if not 0 <= train.seed < 2**32:
        raise UserError(f"train.seed must be in [0, 2^32), the range of the random generators it seeds, got "
                        f"{train.seed}")


def validate(cfg: Config) -> None:
    """The checks every method shares; a method's own (`model.method`, `model.backbone`) are the model factory's."""
    validate_model(cfg.model)
    validate_data_and_train(cfg.data, cfg.train)
    n = len(cfg.model.depths)
    if len(cfg.mask.ratios) != n or not all(0.0 <= r < 1.0 for r in cfg.mask.ratios):
        raise UserError(f"mask.ratios needs {n} values in [0, 1), got {cfg.mask.ratios}")
    if cfg.mask.patch < 1 or (cfg.model.img_size // cfg.model.patch_size) % cfg.mask.patch:
        raise UserError(f"mask.patch={cfg.mask.patch} must divide the token grid "
                        f"{cfg.model.img_size // cfg.model.patch_size}")
    if cfg.loss.recon_normalize not in ("all", "masked"):
        raise UserError(f"loss.recon_normalize must be 'all' or 'masked', got '{cfg.loss.recon_normalize}'")
    if cfg.loss.tau <= 0:
        raise UserError(f"loss.tau must be positive, got {cfg.loss.tau}")
    if not 0.0 <= cfg.ema.decay <= 1.0 or cfg.ema.every < 1:  # the training loop's schedule, for every method
        raise UserError(f"ema.decay must be in [0, 1] and ema.every >= 1, got {cfg.ema.decay}, {cfg.ema.every}")
    choices = {"ema.count": (cfg.ema.count, ("epoch_batches", "optimizer_steps")),
               "ema.teacher_mode": (cfg.ema.teacher_mode, ("train", "eval")),
               "model.perceptual_tap": (cfg.model.perceptual_tap, ("after_next_merge", "stage_output"))}
    for where, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{where} must be one of {', '.join(allowed)}, got '{value}'")
    if cfg.train.batch_size < 2:
        raise UserError("train.batch_size must be at least 2 (the contrastive loss needs negatives)")
    if cfg.train.kernels not in KERNEL_CHOICES:
        raise UserError(f"train.kernels must be one of {', '.join(KERNEL_CHOICES)}, got '{cfg.train.kernels}'")
    validate_optim(cfg.optim)


def validate_optim(o: OptimConfig) -> None:
    """The optimiser section, the same for pretraining and fine-tuning."""
    if o.lr <= 0 or o.weight_decay < 0 or o.gamma <= 0:
        raise UserError(f"optim.lr and optim.gamma must be positive and optim.weight_decay not negative, got "
                        f"{o.lr}, {o.gamma} and {o.weight_decay}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise UserError(f"optim.betas needs two values in [0, 1), got {o.betas}")
    if o.schedule not in ("step", "cosine"):
        raise UserError(f"optim.schedule must be one of step, cosine, got '{o.schedule}'")
    at_least("optim.step_size", o.step_size, 1)
    at_least("optim.warmup_epochs", o.warmup_epochs, 0)
    at_least("optim.lr_batch", o.lr_batch, 0)
    if o.min_lr < 0:
        raise UserError(f"optim.min_lr must not be negative, got {o.min_lr}")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuilds a Config saved with `Config.to_dict` (e.g. from a checkpoint's hyper-parameters, an earlier
    ddmim's included)."""
    cfg = build_dataclass(Config, Config.upgrade(values))
    validate(cfg)
    return cfg
