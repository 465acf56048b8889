"""Fused mask generation: one launch draws the base token mask of a batch and writes every stage's mask.

Reference: `ddmim.models.masking.base_token_mask` + `ddmim.models.masking.stage_masks` (same semantics, a different
random stream). Masks are float32, 1 = visible, 0 = masked. Randomness is Philox keyed by (seed, offset)
so a mask is reproducible from two integers, on any device.

Two ways to draw:
- independent (the seed's): each token is masked with probability `ratio`;
- exact count (SimMIM's): exactly round(ratio * grid^2) tokens per image, chosen uniformly. Each token gets
  a random key whose low bits are its index (keys are then unique), one program sorts an image's keys,
  and a token is masked when its key is among the k smallest.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ddmim_kernels.checks import check_device, index_64

BLOCK = 1024


@triton.jit
def _write_stage_masks(visible, b, y, x, valid, G, out0, out1, out2, out3, NUM_WRITTEN: tl.constexpr):
    """Stage i keeps the top-left token of each 2^i x 2^i block (the seed's strided downsampling)."""
    tl.store(out0 + (b * G + y) * G + x, visible, mask=valid)
    for i in tl.static_range(1, NUM_WRITTEN):
        s = 1 << i
        gi = G // s
        keep = valid & (y % s == 0) & (x % s == 0)
        idx = (b * gi + y // s) * gi + x // s
        if i == 1:
            tl.store(out1 + idx, visible, mask=keep)
        elif i == 2:
            tl.store(out2 + idx, visible, mask=keep)
        else:
            tl.store(out3 + idx, visible, mask=keep)


@triton.jit
def _independent_mask_kernel(out0, out1, out2, out3, n_tokens, G, ratio, seed, offset,
                             NUM_WRITTEN: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    # 32-bit token indices where the batch allows them, so that the index arithmetic divides in 32 bits (24
    # 64-bit divisions and remainders per element before); the random stream's position stays 64-bit
    offs = (pid.to(tl.int64) if INDEX_64 else pid) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_tokens
    u = tl.rand(seed, offs.to(tl.int64) + offset)
    visible = (u >= ratio).to(tl.float32)
    x = offs % G
    y = (offs // G) % G
    b = offs // (G * G)
    _write_stage_masks(visible, b, y, x, valid, G, out0, out1, out2, out3, NUM_WRITTEN)


@triton.jit
def _exact_count_mask_kernel(out0, out1, out2, out3, G, n_masked, seed, offset,
                             NUM_WRITTEN: tl.constexpr, BLOCK_L: tl.constexpr, INDEX_BITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_L)
    L = G * G
    valid = idx < L
    r = tl.randint(seed, b * L + idx + offset).to(tl.uint32)
    keys = ((r >> INDEX_BITS) << INDEX_BITS) | idx.to(tl.uint32)
    keys = tl.where(valid, keys, 0xFFFFFFFF)
    ordered = tl.sort(keys)
    kth = tl.max(tl.where(idx == n_masked - 1, ordered, 0), axis=0)
    visible = ((keys > kth) | (n_masked == 0)).to(tl.float32)
    y = idx // G
    x = idx % G
    _write_stage_masks(visible, b, y, x, valid, G, out0, out1, out2, out3, NUM_WRITTEN)


def fused_masks(batch: int, grid: int, ratios: list[float], *, seed: int, offset: int, device,
                exact_count: bool = False, out: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(base mask (B, grid, grid), [stage i mask (B, grid/2^i, grid/2^i) or None if ratios[i] == 0]).
    `out` may give the float32 buffers of stages 0..k (k the last masked stage) to write into."""
    num_stages = len(ratios)
    if not 1 <= num_stages <= 4:
        raise ValueError(f"ratios must have 1 to 4 entries (one per stage), got {len(ratios)}")
    if not 0.0 <= ratios[0] < 1.0:
        raise ValueError(f"ratios[0] must be in [0, 1), got {ratios[0]}")
    if grid % 2 ** (num_stages - 1):
        raise ValueError(f"grid {grid} is not divisible by 2^(stages-1) = {2 ** (num_stages - 1)}")
    device = torch.device(device)
    check_device("device", torch.empty(0, device=device))
    masked_stages = [i for i, r in enumerate(ratios) if r > 0]
    num_written = max(masked_stages, default=0) + 1
    outs = out or [torch.empty(batch, grid // 2**i, grid // 2**i, device=device) for i in range(num_written)]
    ptrs = outs + [outs[0]] * (4 - num_written)  # unused stage slots point at the base mask
    if exact_count:
        block_l = triton.next_power_of_2(grid * grid)
        _exact_count_mask_kernel[(batch,)](
            *ptrs, grid, round(ratios[0] * grid * grid), seed, offset,
            NUM_WRITTEN=num_written, BLOCK_L=block_l, INDEX_BITS=max(1, int(math.log2(block_l))))
    else:
        n = batch * grid * grid
        programs = triton.cdiv(n, BLOCK)
        _independent_mask_kernel[(programs,)](
            *ptrs, n, grid, float(ratios[0]), seed, offset, NUM_WRITTEN=num_written,
            INDEX_64=index_64(programs, BLOCK), BLOCK=BLOCK)
    stages = [outs[i] if i in masked_stages else None for i in range(num_stages)]
    return outs[0], stages
