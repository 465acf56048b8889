"""RandAugment on normalised batch tensors, for loaders whose pipelines cannot run timm's PIL version
(FFCV, DALI): torchvision's tensor RandAugment per image, on whatever device the batch is on."""
from __future__ import annotations

import re

import torch
from torchvision.transforms import v2


class BatchRandAugment:
    def __init__(self, policy: str, mean: list[float], std: list[float]):
        """policy: timm's string; its magnitude (m) and number of ops (n, default 2) are used."""
        magnitude = re.search(r"-m(\d+)", policy)
        ops = re.search(r"-n(\d+)", policy)
        self.augment = v2.RandAugment(num_ops=int(ops.group(1)) if ops else 2,
                                      magnitude=int(magnitude.group(1)) if magnitude else 9)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = (images.float() * std + mean).clamp(0, 1)
        pixels = torch.stack([self.augment(image) for image in pixels])
        return ((pixels - mean) / std).to(images.dtype)
