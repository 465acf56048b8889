"""Fused (masked) smooth-L1 / L1 / L2 loss: forward and gradient in one pass over pred, target and mask.

Reference: `ddmim.models.losses.reconstruction_loss` (masked) and `ddmim.models.losses.perceptual_losses` (unmasked).

One read of pred, target and the token-level mask; the pixel mask and the `(1 - m)` products are never
materialised. Each program reduces its tile in fp32 into one partial sum; the partial sums are added by
a second, fixed-order reduction, so the result does not depend on scheduling (no float atomics). The
gradient d(loss)/d(pred) is written in the same pass, already divided by the normaliser; backward only
multiplies it by the incoming scalar gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ddmim_kernels.checks import check_loss_inputs, index_64

MODES = {"smooth_l1": 0, "l1": 1, "l2": 2}
BLOCK = 2048


@triton.jit
def _masked_loss_kernel(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, partial_ptr, scale_ptr,
    n_elements, C, H, W, mask_h, mask_w, patch_h, patch_w, beta,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, CHANNELS_LAST: tl.constexpr, TARGET_CHANNELS_LAST: tl.constexpr,
    WRITE_GRAD: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    # 32-bit offsets where the tensor allows them: the index arithmetic below then divides in 32 bits (64-bit
    # division and remainder are long instruction sequences, 10 per element here)
    offs = (pid.to(tl.int64) if INDEX_64 else pid) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_elements
    t_offs = offs
    if HAS_MASK:  # (B, C, H, W): memory offset -> (b, c, y, x) of the element, in pred's own layout
        if CHANNELS_LAST:
            c = offs % C
            x = (offs // C) % W
            y = (offs // (C * W)) % H
        else:
            x = offs % W
            y = (offs // W) % H
            c = (offs // (H * W)) % C
        b = offs // (C * H * W)
        if TARGET_CHANNELS_LAST and not CHANNELS_LAST:
            t_offs = ((b * H + y) * W + x) * C + c
        if CHANNELS_LAST and not TARGET_CHANNELS_LAST:
            t_offs = ((b * C + c) * H + y) * W + x
    p = tl.load(pred_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + t_offs, mask=valid, other=0.0).to(tl.float32)  # in its own dtype: fp32 stays fp32
    d = p - t
    if MODE == 0:
        ad = tl.abs(d)
        small = ad < beta
        loss = tl.where(small, 0.5 * d * d / beta, ad - 0.5 * beta)
        grad = tl.where(small, d / beta, tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)))
    elif MODE == 1:
        loss = tl.abs(d)
        grad = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:
        loss = d * d
        grad = 2.0 * d
    # NaN/inf in an input propagate (loss * 0 is NaN), as in the reference's product with (1 - m)
    if HAS_MASK:
        m = tl.load(mask_ptr + (b * mask_h + y // patch_h) * mask_w + x // patch_w, mask=valid, other=1)
        hidden = (m == 0).to(tl.float32)
        loss = loss * hidden
        grad = grad * hidden
    loss = tl.where(valid, loss, 0.0)
    tl.store(partial_ptr + pid, tl.sum(loss, axis=0))
    if WRITE_GRAD:
        scale = tl.load(scale_ptr)
        tl.store(grad_ptr + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=valid)


def _layout(x: torch.Tensor) -> bool:
    """True for channels-last (B, C, H, W); False for contiguous. Anything else is refused by the checks."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def masked_loss_forward(pred, target, mask, *, mode, beta, normalize, write_grad, grad_out=None, partials=None):
    """Returns (loss, grad_pred or None). `mask` (B, h, w), 0 = masked, or None for an unmasked loss.
    `grad_out` (like pred) and `partials` (one float32 per program) may be given to reuse buffers."""
    mode = "l1" if mode == "smooth_l1" and beta == 0 else mode
    channels_last = _layout(pred)
    n = pred.numel()
    if mask is not None:
        B, C, H, W = pred.shape
        mh, mw = mask.shape[1:]
        ph, pw = H // mh, W // mw
        mask_u8 = mask.to(torch.uint8).contiguous() if mask.dtype != torch.uint8 else mask.contiguous()
    else:
        C = H = W = mh = mw = ph = pw = 1
        mask_u8 = pred  # unused placeholder pointer
    if normalize == "masked" and mask is not None:
        masked = (mask_u8 == 0).sum(dtype=torch.float32) * (ph * pw * C)
        scale = 1.0 / masked.clamp_min(1.0)
    else:
        scale = torch.full((), 1.0 / n, dtype=torch.float32, device=pred.device)
    scale = scale.reshape(1)
    grid = (triton.cdiv(n, BLOCK),)
    if partials is None:
        partials = torch.empty(grid[0], dtype=torch.float32, device=pred.device)
    grad = (torch.empty_like(pred) if grad_out is None else grad_out) if write_grad else pred
    _masked_loss_kernel[grid](
        pred, target, mask_u8, grad, partials, scale,
        n, C, H, W, mh, mw, ph, pw, float(beta),
        MODE=MODES[mode], HAS_MASK=mask is not None, CHANNELS_LAST=channels_last,
        TARGET_CHANNELS_LAST=_layout(target), WRITE_GRAD=write_grad, INDEX_64=index_64(grid[0], BLOCK), BLOCK=BLOCK,
        num_warps=8,
    )
    loss = partials.sum() * scale[0]
    return loss, (grad if write_grad else None)


# A custom operator, so that torch.compile keeps the kernel as one node of its graph instead of tracing into the
# launcher (and inductor does not try to fuse what is fused already).
@torch.library.custom_op("ddmim::masked_loss", mutates_args=())
def _masked_loss_op(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], mode: str, beta: float,
                    normalize: str, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = masked_loss_forward(pred, target, mask, mode=mode, beta=beta, normalize=normalize,
                                     write_grad=write_grad)
    return loss, grad if grad is not None else pred.new_empty(0)


@_masked_loss_op.register_fake
def _(pred, target, mask, mode, beta, normalize, write_grad):
    return pred.new_empty((), dtype=torch.float32), torch.empty_like(pred) if write_grad else pred.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.used = False


def _backward(ctx, grad_loss, _unused):
    if ctx.used:
        raise RuntimeError("backward through a fused masked loss a second time (retain_graph) is not "
                           "supported: its stored gradient was scaled in place by the first backward")
    ctx.used = True
    (grad,) = ctx.saved_tensors
    # scaled in place: the gradient-sized buffer written in forward is the only one ever allocated
    grad = grad.mul_(grad_loss.to(grad.dtype))
    grad_pred = grad if ctx.needs_input_grad[0] else None
    grad_target = grad.neg() if ctx.needs_input_grad[1] else None
    return grad_pred, grad_target, None, None, None, None, None


_masked_loss_op.register_autograd(_backward, setup_context=_setup_context)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
                mode: str = "smooth_l1", beta: float = 1.0, normalize: str = "all") -> torch.Tensor:
    """Fused loss between `pred` and `target` over the pixels whose token is masked (mask == 0).

    pred, target: (B, C, H, W), each contiguous or channels-last and each fp32/bf16/fp16 (read in its own layout
    and dtype: no copy, and an fp32 target stays fp32 beside a bf16 prediction); or, with mask=None, any
    contiguous shape (e.g. (B, L, D) or (B, H, W, D) features). mask: (B, h, w) bool/uint8/float with
    H/h and W/w integers (the patch size). beta=0 gives L1; mode "l2" the squared error.
    normalize "all": divide by B*C*H*W (seed); "masked": by the number of masked pixels * C (SimMIM).
    """
    check_loss_inputs(pred, target, mask, mode=mode, normalize=normalize, modes=MODES)
    write_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    return _masked_loss_op(pred, target, mask, mode, float(beta), normalize, write_grad)[0]
