"""The fused Triton kernels or their PyTorch references, chosen once when a model is built.

`resolve_kernels("auto" | "triton" | "torch", cuda=...)` turns the choice into the functions the model
calls (`KernelOps`): auto means Triton on CUDA when Triton is installed, the references otherwise.
triton needs CUDA or TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests); torch always works.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ddmim.errors import UserError
from ddmim.models.losses import perceptual_losses, reconstruction_loss
from ddmim.models.masking import base_token_mask, stage_masks


def check_kernels(choice: str) -> None:
    """Refuses at start-up a choice this machine cannot run."""
    if choice == "triton":
        if importlib.util.find_spec("triton") is None:
            raise UserError("--kernels triton: the triton package is not installed")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1 for Triton's slow "
                            "CPU interpreter); use --kernels auto or torch on this machine")


def _triton_recon_loss(pred, target, token_mask, *, beta: float, normalize: str) -> torch.Tensor:
    from ddmim_kernels.masked_loss import masked_loss

    # the kernel reads each in its own layout and dtype: no copy, and the fp32 images stay fp32 under autocast
    return masked_loss(pred, target, token_mask, beta=beta, normalize=normalize)


def _triton_stage_losses(student: list[torch.Tensor], teacher: list[torch.Tensor], *, beta: float):
    from ddmim_kernels.masked_loss import masked_loss

    return [masked_loss(s.contiguous(), t.detach().contiguous(), None, beta=beta) for s, t in zip(student, teacher)]


def _base_masks(batch: int, grid: int, ratio: float, *, exact_count: bool, seed: int, index: int,
                device: torch.device, triton: bool) -> torch.Tensor:
    if triton:
        from ddmim_kernels.mask_gen import fused_masks

        return fused_masks(batch, grid, [ratio], seed=seed, offset=index * batch * grid * grid, device=device,
                           exact_count=exact_count)[0]
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    return base_token_mask(batch, grid, ratio, exact_count=exact_count, device=device, generator=generator)


def draw_masks(batch: int, grid: int, ratios: list[float], *, exact_count: bool, seed: int, index: int, device,
               patch: int = 1, triton: bool = False) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Base mask and stage masks of draw number `index` of the stream `seed`: reproducible from two integers.
    With patch > 1 the mask is drawn on the coarser grid of patch x patch-token units, then expanded."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if patch > 1:
        coarse = _base_masks(batch, grid // patch, ratios[0], exact_count=exact_count, seed=seed, index=index,
                             device=device, triton=triton)
        base = coarse.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    elif triton:
        from ddmim_kernels.mask_gen import fused_masks

        return fused_masks(batch, grid, ratios, seed=seed, offset=index * batch * grid * grid, device=device,
                           exact_count=exact_count)
    else:
        base = _base_masks(batch, grid, ratios[0], exact_count=exact_count, seed=seed, index=index, device=device,
                           triton=False)
    return base, stage_masks(base, ratios)


@dataclass(frozen=True)
class KernelOps:
    """The functions a model calls for its masked losses and masks."""
    triton: bool
    recon_loss: Callable[..., torch.Tensor]
    stage_losses: Callable[..., list[torch.Tensor]]
    draw_masks: Callable[..., tuple[torch.Tensor, list[torch.Tensor | None]]]


def resolve_kernels(choice: str, *, cuda: bool) -> KernelOps:
    triton = choice == "triton" or (choice == "auto" and cuda and importlib.util.find_spec("triton") is not None)
    if triton:
        return KernelOps(True, _triton_recon_loss, _triton_stage_losses, partial(draw_masks, triton=True))
    return KernelOps(False, reconstruction_loss, perceptual_losses, draw_masks)
