"""RandAugment's operations on a batch where torchvision's own functions would build a small tensor from Python
values on the batch's device at every call (a blocking host-to-device copy on a GPU): the geometric operations,
Sharpness and AutoContrast (whose boolean-mask assignment also waits for a GPU). Each gives what torchvision's
function gives, which the tests hold it to; the values that change per call travel from pinned host memory
without blocking."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn.functional import conv2d
from torchvision.transforms.functional import _get_inverse_affine_matrix
from torchvision.transforms.v2.functional._geometry import _apply_grid_transform

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def staged(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (anything numpy reads) as a tensor on `device`. The host tensor is filled through numpy, so no
    operator reads Python data, and reaches a GPU from pinned memory without the host waiting."""
    values = np.asarray(values)
    host = torch.empty(values.shape, dtype=dtype, pin_memory=device.type == "cuda")
    host.numpy()[...] = values
    return host.to(device, non_blocking=True)


def inverse_matrix(name: str, magnitude: float, height: int, width: int) -> list[float]:
    """The 2x3 inverse affine matrix torchvision's RandAugment gives `name` at `magnitude` (its shears turn
    about the top-left corner, translations and rotations about the centre)."""
    if name == "Rotate":
        return _get_inverse_affine_matrix([0.0, 0.0], -(magnitude % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    if name in ("TranslateX", "TranslateY"):
        shift = [float(int(magnitude)), 0.0] if name == "TranslateX" else [0.0, float(int(magnitude))]
        return _get_inverse_affine_matrix([0.0, 0.0], 0.0, shift, 1.0, [0.0, 0.0])
    degrees = math.degrees(math.atan(magnitude))
    shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
    return _get_inverse_affine_matrix([-width * 0.5, -height * 0.5], 0.0, [0.0, 0.0], 1.0, shear)


class GeometricBatch:
    """Every geometric operation of a round, each image with its own matrix, in one grid sample."""

    def __init__(self, interpolation: str, fill):
        self.interpolation, self.fill = interpolation, fill
        self._bases: dict = {}

    def _base(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Pixel centres relative to the image centre, (1, H*W, 3) with a column of ones; one per size."""
        key = (height, width, device)
        if key not in self._bases:
            base = torch.empty(1, height, width, 3, device=device)
            base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device))
            base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height,
                                              device=device).unsqueeze(-1))
            base[..., 2].fill_(1)
            self._bases[key] = base.view(1, height * width, 3)
        return self._bases[key]

    def thetas(self, picks: list[tuple[str, float]], height: int, width: int) -> np.ndarray:
        """(N, 3, 2) float32: each matrix transposed and scaled to grid_sample's [-1, 1] coordinates."""
        matrices = np.array([inverse_matrix(name, magnitude, height, width) for name, magnitude in picks],
                            dtype=np.float32).reshape(-1, 2, 3)
        return matrices.transpose(0, 2, 1) / np.array([0.5 * width, 0.5 * height], dtype=np.float32)

    def __call__(self, pixels: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
        count, _, height, width = pixels.shape
        grid = self._base(height, width, pixels.device).expand(count, -1, -1).bmm(thetas)
        return _apply_grid_transform(pixels, grid.view(count, height, width, 2), self.interpolation, self.fill)


class Kernels:
    """Constant tensors made once per device and dtype: built from Python values, they would be a blocking copy
    at every call on a GPU."""

    def __init__(self):
        self._made: dict = {}

    def smoothing(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The 3x3 kernel of PIL's SMOOTH filter (1s around a 5, over 13), one per channel."""
        if (device, dtype) not in self._made:
            kernel = torch.ones(3, 3, dtype=torch.float64)
            kernel[1, 1] = 5.0
            self._made[device, dtype] = (kernel / 13.0).to(device, dtype).expand(3, 1, 3, 3)
        return self._made[device, dtype]


def sharpness(pixels: torch.Tensor, factor: float, kernel: torch.Tensor) -> torch.Tensor:
    """Blends pixels in [0, 1] with their smoothed interior (the border stays) by `factor`."""
    out = pixels.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.add_(conv2d(pixels, kernel, groups=pixels.shape[1]).sub_(inner), alpha=1.0 - factor)
    return out.clamp_(0, 1)


def autocontrast(pixels: torch.Tensor) -> torch.Tensor:
    """Stretches each channel of pixels in [0, 1] to the full range; a flat channel stays as it is."""
    low = pixels.amin(dim=(-2, -1), keepdim=True)
    high = pixels.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = (high - low).masked_fill_(flat, 1.0)
    return (pixels - low.masked_fill(flat, 0.0)).div_(scale).clamp_(0, 1)
