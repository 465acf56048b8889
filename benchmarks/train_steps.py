"""One training step of a preset in a named variant, on synthetic batches already on the device: what the training
benchmarks, the profile and the Lightning comparison all time.

A preset spec may carry overrides after a colon (`seed:model.drop_path_rate=0,ema.teacher_mode=eval`).
Variants (the GPU suite's comparisons):
  eager          fused Triton kernels, no compilation
  channels_last  the same, with channels-last images and convolutions
  compile        torch.compile of the model with the PyTorch reference kernels (inductor fuses them itself)
  compile_fused  torch.compile with the fused Triton kernels
  torch_kernels  the PyTorch reference kernels, no compilation
  timm_attention as eager, with timm's own SwinV2 window attention instead of the fused one
A pretraining step is what DDMIMModule does: masks of the step's draw, forward (student, teacher, decoder,
losses), backward, fused AdamW on CUDA, and the EMA update on the preset's schedule. A fine-tuning step:
forward, cross-entropy (mixup/cutmix and label smoothing as the preset says), backward, timm's AdamW.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ddmim.config import make_config
from ddmim.finetune_config import make_finetune_config
from ddmim.models.factory import pretraining_model
from ddmim.models.kernels import check_kernels, resolve_kernels
from ddmim.train.compile import CompiledForward, compile_report

VARIANTS = {
    "eager": {"kernels": "triton", "compile": False, "channels_last": False},
    "channels_last": {"kernels": "triton", "compile": False, "channels_last": True},
    "compile": {"kernels": "torch", "compile": True, "channels_last": False},
    "compile_fused": {"kernels": "triton", "compile": True, "channels_last": False},
    "torch_kernels": {"kernels": "torch", "compile": False, "channels_last": False},
    "timm_attention": {"kernels": "triton", "compile": False, "channels_last": False,
                       "set": ["model.fused_attention=false"]},
}


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """'seed:a.b=1,c.d=2' -> ('seed', ['a.b=1', 'c.d=2'])."""
    preset, _, overrides = spec.partition(":")
    return preset, [o for o in overrides.split(",") if o]


def phase(name: str):
    """A named range for torch.profiler (free when no profiler runs)."""
    return torch.profiler.record_function(f"ddmim:{name}")


@dataclass
class Step:
    """`run()` does one training step; `phases` are its parts in order, for timing them one by one."""
    preset: str
    variant: str
    batch: int
    img_size: int
    model: torch.nn.Module
    phases: list[tuple[str, Callable[[], None]]]
    flops_per_image: float
    compiled: CompiledForward | None
    last_loss: list[torch.Tensor] = field(default_factory=list)

    def run(self) -> None:
        for name, fn in self.phases:
            with phase(name):
                fn()

    def loss(self) -> float:
        return float(self.last_loss[-1]) if self.last_loss else float("nan")

    def report(self) -> dict:
        return compile_report(self.compiled)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _flops_per_image(model: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor]) -> float:
    """Lightning's FLOP counter on two images, forward and backward, per image."""
    from lightning_fabric.utilities.throughput import measure_flops

    flops = measure_flops(model, lambda: loss_fn(2), loss_fn=lambda loss: loss)
    model.zero_grad(set_to_none=True)
    return flops / 2


def _images(batch: int, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = torch.randn(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def pretrain_step(spec: str, variant: str, batch: int, device: torch.device, precision: str,
                  compile_backend: str = "inductor") -> Step:
    v = VARIANTS[variant]
    preset, overrides = parse_spec(spec)
    cfg = make_config(preset, overrides + v.get("set", []))
    check_kernels(v["kernels"])
    torch.manual_seed(0)
    model = pretraining_model(cfg, kernels=resolve_kernels(v["kernels"], cuda=device.type == "cuda")).to(device)
    if v["channels_last"]:
        model.to_channels_last()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    size = cfg.model.img_size
    images = _images(batch, size, device, v["channels_last"])
    autocast = _autocast(device, precision)

    def loss_of(forward, count: int) -> torch.Tensor:
        base, masks = model.draw_masks(count, device=device, seed=cfg.train.seed)
        with autocast:
            return forward(images[:count], base, masks)["loss"]

    flops = _flops_per_image(model, lambda count: loss_of(model, count))
    compiled = CompiledForward(model, backend=compile_backend) if v["compile"] else None
    if compiled is not None:
        compiled.trial(lambda forward: loss_of(forward, batch))
    forward = compiled or model
    state = {"step": 0, "masks": None, "loss": None}
    out: list[torch.Tensor] = []

    def masks() -> None:
        state["masks"] = model.draw_masks(batch, device=device, seed=cfg.train.seed, index=state["step"])

    def forward_backward() -> None:
        base, stage = state["masks"]
        with autocast:
            loss = forward(images, base, stage)["loss"]
        loss.backward()
        out[:] = [loss.detach()]

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def ema() -> None:
        if state["step"] % cfg.ema.every == 0:
            model.update_teacher(cfg.ema.decay)
        state["step"] += 1

    return Step(spec, variant, batch, size, model,
                [("masks", masks), ("forward_backward", forward_backward), ("optimizer", optimizer_step),
                 ("ema", ema)], flops, compiled, out)


def finetune_step(spec: str, variant: str, batch: int, device: torch.device, precision: str,
                  compile_backend: str = "inductor", num_classes: int = 1000) -> Step:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from ddmim.models.factory import classifier
    from ddmim.train.finetune import make_optimizer

    v = VARIANTS[variant]
    preset, overrides = parse_spec(spec)
    cfg = make_finetune_config(preset, overrides + v.get("set", []))
    a = cfg.augment
    torch.manual_seed(0)
    net = classifier(cfg.model, num_classes, cfg.head.kind, cfg.head.hidden, a.drop_path).to(device)
    if v["channels_last"]:
        net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net, cfg.optim, cfg.optim.lr)
    size = cfg.model.img_size
    images = _images(batch, size, device, v["channels_last"])
    labels = torch.arange(batch, device=device) % num_classes
    mixup = (Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                   num_classes=num_classes) if a.mixup > 0 or a.cutmix > 0 else None)
    soft_ce = SoftTargetCrossEntropy()
    autocast = _autocast(device, precision)

    def loss_of(forward, count: int) -> torch.Tensor:
        x, y = images[:count], labels[:count]
        with autocast:
            if mixup is not None:
                x, soft = mixup(x, y)
                return soft_ce(forward(x), soft)
            return F.cross_entropy(forward(x), y, label_smoothing=a.label_smoothing)

    flops = _flops_per_image(net, lambda count: loss_of(net, count))
    compiled = CompiledForward(net, backend=compile_backend) if v["compile"] else None
    if compiled is not None:
        compiled.trial(lambda forward: loss_of(forward, batch))
    forward = compiled or net
    out: list[torch.Tensor] = []

    def forward_backward() -> None:
        loss = loss_of(forward, batch)
        loss.backward()
        out[:] = [loss.detach()]

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Step(spec, variant, batch, size, net, [("forward_backward", forward_backward),
                                                  ("optimizer", optimizer_step)], flops, compiled, out)
