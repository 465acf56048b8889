"""Every Triton kernel launch a pretraining preset makes, at any batch size, found without a GPU.

A forward pass at batch 2 on the CPU, through kernel functions that note their arguments and answer with the
PyTorch references, gives each call's shapes, dtypes and layouts (bf16 as CPU autocast gives them, which casts
the same operators as CUDA's). The calls are then made again with meta tensors at the wanted batch, through the
Triton functions the model would use on CUDA, with the launches recorded instead of run: a training step (the
loss writes its gradient) and a validation step (it does not).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from ddmim.config import make_config
from ddmim.models.factory import pretraining_model
from ddmim.models.kernels import KernelOps, resolve_kernels
from ddmim_kernels.aot import Launch, compile_launch, record_launches, specialisation_key

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _meta_like(x: torch.Tensor, batch: int, grad: bool = False) -> torch.Tensor:
    shape = (batch, *x.shape[1:])
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = torch.empty(shape, dtype=x.dtype, device="meta", memory_format=torch.channels_last if cl
                    else torch.contiguous_format)
    return y.requires_grad_(grad)


def kernel_calls(preset: str, dtype: str, channels_last: bool) -> list[tuple[str, tuple, dict]]:
    """(name, args, kwargs) of each KernelOps call of one training forward of `preset` at batch 2."""
    cfg = make_config(preset)
    calls = []
    reference = resolve_kernels("torch", cuda=False)

    def noting(name, fn):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return call

    ops = KernelOps(True, noting("recon_loss", reference.recon_loss), noting("stage_losses", reference.stage_losses),
                    noting("draw_masks", reference.draw_masks))
    torch.manual_seed(0)
    model = pretraining_model(cfg, kernels=ops).train()
    size = cfg.model.img_size
    images = torch.rand(2, 3, size, size)
    if channels_last:
        model.to_channels_last()
        images = images.contiguous(memory_format=torch.channels_last)
    base, masks = model.draw_masks(2, seed=0)
    autocast = torch.autocast("cpu", dtype=DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext()
    with autocast:
        model(images, base, masks)
    return calls


def _replay(calls, batch: int, train: bool) -> None:
    ops = resolve_kernels("triton", cuda=True)
    for name, args, kwargs in calls:
        if name == "draw_masks":
            getattr(ops, name)(batch, *args[1:], **{**kwargs, "device": "meta"})
        elif name == "recon_loss":
            pred, target, mask = args
            ops.recon_loss(_meta_like(pred, batch, train), _meta_like(target, batch), _meta_like(mask, batch),
                           **kwargs)
        else:
            student, teacher = args
            ops.stage_losses([_meta_like(s, batch, train) for s in student], [_meta_like(t, batch) for t in teacher],
                             **kwargs)


def preset_launches(presets, batch: int, dtypes=("bf16", "fp32"), layouts=(False, True),
                    capability: int = 90) -> list[Launch]:
    """The distinct launches (one per binary Triton would build for sm_<capability>) of the presets' training and
    validation steps; each labelled with the first preset, dtype, layout and step that makes it."""
    launches: dict[tuple, Launch] = {}
    for preset in presets:
        for dtype in dtypes:
            for cl in layouts:
                calls = kernel_calls(preset, dtype, cl)
                for train in (True, False):
                    layout, step = "channels-last" if cl else "contiguous", "train" if train else "val"
                    label = f"{preset} {dtype} {layout} {step}"
                    with record_launches(label) as found, torch.set_grad_enabled(train):
                        _replay(calls, batch, train)
                    for launch in found:
                        launches.setdefault(specialisation_key(launch, capability), replace(launch, label=label))
    return list(launches.values())


def aot_rows(presets, batch: int, capability: int = 90) -> list[dict]:
    """Each distinct launch of the presets compiled for cuda sm_<capability>: registers, spills, shared memory."""
    return [compile_launch(launch, capability) for launch in preset_launches(presets, batch, capability=capability)]
