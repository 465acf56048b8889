"""Chooses, per call, between the Triton kernels and their PyTorch references (`train.kernels`).

auto: Triton for CUDA tensors, PyTorch otherwise. triton: always Triton, which needs CUDA or
TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests). torch: always the references.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ddmim.errors import UserError
from ddmim.losses import perceptual_losses, reconstruction_loss
from ddmim.masking import base_token_mask, stage_masks


def check_kernels(choice: str) -> None:
    """Refuses at start-up a choice this machine cannot run."""
    if choice == "triton":
        if importlib.util.find_spec("triton") is None:
            raise UserError("--kernels triton: the triton package is not installed")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1 for Triton's slow "
                            "CPU interpreter); use --kernels auto or torch on this machine")


def use_triton(choice: str, device: torch.device) -> bool:
    if choice == "auto":
        return device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return choice == "triton"


def recon_loss(choice: str, pred, target, token_mask, *, beta: float, normalize: str) -> torch.Tensor:
    if not use_triton(choice, pred.device):
        return reconstruction_loss(pred, target, token_mask, beta=beta, normalize=normalize)
    from kernels.masked_loss import masked_loss

    # the kernel reads pred and target in one layout and dtype; under autocast the target joins pred's dtype
    target = target.to(pred.dtype)
    if pred.stride() != target.stride():
        pred = pred.contiguous(memory_format=torch.channels_last if not target.is_contiguous()
                               else torch.contiguous_format)
    return masked_loss(pred, target, token_mask, beta=beta, normalize=normalize)


def stage_losses(choice: str, student: list[torch.Tensor], teacher: list[torch.Tensor], *, beta: float):
    if not use_triton(choice, student[0].device):
        return perceptual_losses(student, teacher, beta=beta)
    from kernels.masked_loss import masked_loss

    return [masked_loss(s.contiguous(), t.detach().to(s.dtype).contiguous(), None, beta=beta)
            for s, t in zip(student, teacher)]


def draw_masks(choice: str, batch: int, grid: int, ratios: list[float], *, exact_count: bool, seed: int,
               index: int, device, patch: int = 1) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Base mask and stage masks of draw number `index` of the stream `seed`: reproducible from two integers.
    With patch > 1 the mask is drawn on the coarser grid of patch x patch-token units, then expanded."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if patch > 1:
        coarse, _ = draw_masks(choice, batch, grid // patch, ratios[:1], exact_count=exact_count, seed=seed,
                               index=index, device=device)
        base = coarse.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
        return base, stage_masks(base, ratios)
    if use_triton(choice, device):
        from kernels.mask_gen import fused_masks

        return fused_masks(batch, grid, ratios, seed=seed, offset=index * batch * grid * grid, device=device,
                           exact_count=exact_count)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    base = base_token_mask(batch, grid, ratios[0], exact_count=exact_count, device=device, generator=generator)
    return base, stage_masks(base, ratios)
