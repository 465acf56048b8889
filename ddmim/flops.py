"""FLOPs of one DDMIM training step, counted by PyTorch's FLOP counter (matmuls and convolutions)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddmim.model import DDMIM


def step_flops(model: DDMIM, images: torch.Tensor) -> float:
    """Forward and backward of one batch; the gradients it leaves are cleared again."""
    base, masks = model.draw_masks(len(images), device=images.device)
    with FlopCounterMode(display=False) as counter:
        model(images, base, masks)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def flops_per_image(model: DDMIM, device: torch.device, batch: int = 2) -> float:
    size = model.cfg.model.img_size
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global random stream untouched
    images = torch.randn(batch, 3, size, size, device=device, generator=generator)
    return step_flops(model, images) / batch
