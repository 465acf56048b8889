"""What the kernels' launchers share: argument checks (every mistake is a ValueError raised before a launch) and
the choice of index width."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def index_64(programs: int, block: int) -> bool:
    """Whether a launch of `programs` programs of `block` elements needs 64-bit offsets (the kernels' INDEX_64)."""
    return programs * block >= 2**31


def check_device(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {tensor.device}, but this Triton kernel needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run it in Triton's CPU interpreter)")


def check_loss_inputs(pred, target, mask, *, mode: str, normalize: str, modes) -> None:
    if mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {mode!r}")
    if normalize not in ("all", "masked"):
        raise ValueError(f"normalize must be 'all' or 'masked', got {normalize!r}")
    if pred.dtype not in FLOAT_DTYPES:
        raise ValueError(f"pred has dtype {pred.dtype}; expected one of float32, bfloat16, float16")
    if target.shape != pred.shape:
        raise ValueError(f"target has shape {tuple(target.shape)} but pred has {tuple(pred.shape)}")
    if target.dtype not in FLOAT_DTYPES:
        raise ValueError(f"target has dtype {target.dtype}; expected one of float32, bfloat16, float16")
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")
    check_device("pred", pred)
    if mask is None:
        if not pred.is_contiguous() or not target.is_contiguous():
            raise ValueError("pred and target must be contiguous when no mask is given")
        return
    if pred.dim() != 4:
        raise ValueError(f"pred must be (B, C, H, W) when a mask is given, got shape {tuple(pred.shape)}")
    for name, x in (("pred", pred), ("target", target)):
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError(f"{name} must be contiguous or channels-last (strides {x.stride()})")
    if mask.dim() != 3 or mask.shape[0] != pred.shape[0]:
        raise ValueError(f"mask must be (B, h, w) with B={pred.shape[0]}, got shape {tuple(mask.shape)}")
    if mask.device != pred.device:
        raise ValueError(f"mask is on {mask.device} but pred is on {pred.device}")
    if mask.dtype not in (torch.bool, torch.uint8, *FLOAT_DTYPES):
        raise ValueError(f"mask has dtype {mask.dtype}; expected bool, uint8 or a float 0/1 mask")
    H, W = pred.shape[2:]
    h, w = mask.shape[1:]
    if h == 0 or w == 0 or H % h or W % w:
        raise ValueError(f"mask of size {h}x{w} does not divide the image size {H}x{W}")
