"""RandAugment on normalised batch tensors, for loaders whose pipelines cannot run timm's PIL version
(FFCV, DALI), on whatever device the batch is on.

Each image draws its own operations, as torchvision's per-image RandAugment does (same space, magnitudes
and sign rule, from torchvision's own table and functions). The draws are made on the host, and the images
that drew the same operation and sign are transformed together, the geometric operations all in one grid
sample: a few batched calls a round instead of a Python loop over images. The host never waits for the device,
and no operator builds a device tensor from Python values (`augment_ops`).
"""
from __future__ import annotations

import random
import re
from collections import defaultdict

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2._utils import _get_fill

from ddmim.data.augment_ops import GEOMETRIC, GeometricBatch, Kernels, autocontrast, sharpness, staged


class BatchRandAugment:
    def __init__(self, policy: str, mean: list[float], std: list[float]):
        """policy: timm's string; its magnitude (m) and number of ops (n, default 2) are used."""
        magnitude = re.search(r"-m(\d+)", policy)
        ops = re.search(r"-n(\d+)", policy)
        self.augment = v2.RandAugment(num_ops=int(ops.group(1)) if ops else 2,
                                      magnitude=int(magnitude.group(1)) if magnitude else 9)
        self.names = list(self.augment._AUGMENTATION_SPACE)
        self.mean, self.std = mean, std
        self._constants: dict = {}
        self._magnitudes: dict = {}
        self.fill = _get_fill(self.augment._fill, torch.Tensor)
        interpolation = self.augment.interpolation  # an InterpolationMode or its name, by version
        self.geometric = GeometricBatch(getattr(interpolation, "value", interpolation), self.fill)
        self.kernels = Kernels()

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # made once per device, at the first batch, with Sharpness's kernel (not at the first batch that draws
        # it, which may be any step): a tensor built from Python values is a blocking copy on a GPU
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                                       torch.tensor(self.std, device=device).view(1, 3, 1, 1))
            self.kernels.smoothing(device, torch.float32)
        return self._constants[device]

    def _magnitude(self, name: str, height: int, width: int) -> tuple[float, bool]:
        """(magnitude, signed) of one operation at this image size, as torchvision's RandAugment takes it."""
        if (height, width) not in self._magnitudes:  # read once per size: torchvision's table holds tensors
            table = {}
            for op, (magnitudes_fn, signed) in self.augment._AUGMENTATION_SPACE.items():
                magnitudes = magnitudes_fn(self.augment.num_magnitude_bins, height, width)
                table[op] = ((0.0, False) if magnitudes is None
                             else (float(magnitudes[self.augment.magnitude]), signed))
            self._magnitudes[height, width] = table
        return self._magnitudes[height, width][name]

    def draw(self, count: int, height: int, width: int) -> list[list[tuple[str, float]]]:
        """Per round, per image: (operation, signed magnitude), drawn as torchvision draws them."""
        rounds = []
        for _ in range(self.augment.num_ops):
            picks = []
            for _ in range(count):
                name = self.names[random.randrange(len(self.names))]
                value, signed = self._magnitude(name, height, width)
                picks.append((name, -value if signed and random.random() <= 0.5 else value))
            rounds.append(picks)
        return rounds

    def apply(self, pixels: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
        """One operation on (N, 3, H, W) pixels in [0, 1], through torchvision's own function: the reference."""
        return self.augment._apply_image_or_video_transform(pixels, name, magnitude,
                                                            interpolation=self.augment.interpolation,
                                                            fill=self.augment._fill)

    def _apply_group(self, pixels: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
        """`apply`, where torchvision's function would build a tensor from Python values on the device."""
        if name == "Sharpness":
            return sharpness(pixels, 1.0 + magnitude, self.kernels.smoothing(pixels.device, pixels.dtype))
        if name == "AutoContrast":
            return autocontrast(pixels)
        return self.apply(pixels, name, magnitude)

    def transform(self, pixels: torch.Tensor, rounds: list[list[tuple[str, float]]]) -> torch.Tensor:
        """Applies the drawn rounds: the geometric draws of a round in one call, each other group of images
        with the same draw in one call."""
        height, width = pixels.shape[-2:]
        for picks in rounds:
            moved = [p for p, (name, _) in enumerate(picks) if name in GEOMETRIC]
            groups = defaultdict(list)
            for position, pick in enumerate(picks):
                if pick[0] not in GEOMETRIC:
                    groups[pick].append(position)
            order = staged([*moved, *(p for members in groups.values() for p in members)], torch.int64,
                           pixels.device)
            out = torch.empty_like(pixels)
            if moved:
                thetas = staged(self.geometric.thetas([picks[p] for p in moved], height, width), torch.float32,
                                pixels.device)
                where = order[:len(moved)]
                out.index_copy_(0, where, self.geometric(pixels.index_select(0, where), thetas))
            start = len(moved)
            for (name, magnitude), members in groups.items():
                where = order[start:start + len(members)]
                out.index_copy_(0, where, self._apply_group(pixels.index_select(0, where), name, magnitude))
                start += len(members)
            pixels = out
        return pixels

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._on(images.device)
        pixels = (images.float() * std + mean).clamp(0, 1)
        pixels = self.transform(pixels, self.draw(len(pixels), *pixels.shape[-2:]))
        return ((pixels - mean) / std).to(images.dtype)
