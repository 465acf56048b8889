"""FFCV's crop decoders, made to tell when a stored JPEG does not decode, and to crop and flip reproducibly.

FFCV's own decoders ignore libjpeg-turbo's return code, so damaged bytes in a .beton become a garbage
image that trains silently. These decoders check it. A sample that fails comes out as a marker image: its
top half one fixed colour, its bottom half the sample's index in base 256 (R + 256 G + 65536 B). Both
survive normalisation, so `MarkReader` can name the sample from the finished batch.

FFCV draws crops (and RandomHorizontalFlip its flips) from numba's per-thread generators, which are seeded
from the OS: two runs with one seed crop differently, and a resumed run cannot repeat a crop. The training
decoder seeds its thread's generator for each sample from the run's seed, the sample, its place in the batch
and the batch's first two samples (which the epoch's seeded order fixes), then draws the crop and the flip.
"""
from __future__ import annotations

import numpy as np
import torch
from ffcv.fields.rgb_image import (
    IMAGE_MODES,
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
)
from ffcv.libffcv import ctypes_imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

MARK = (7, 251, 19)  # the top half of a failed sample's image


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x):
    """splitmix64's finaliser: nearby inputs give unrelated outputs."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _flip_columns(image):
    """Mirrors a C-contiguous (H, W, 3) image in place, a pixel's three bytes at a time: 23 us at 224 px here,
    where swapping column copies took 190 us (an eighth of the decode of a flipped sample)."""
    height, width, channels = image.shape
    rows = image.reshape(height, width * channels)
    for r in range(height):
        row = rows[r]
        for c in range(width // 2):
            i, j = c * 3, (width - 1 - c) * 3
            t0, t1, t2 = row[i], row[i + 1], row[i + 2]
            row[i], row[i + 1], row[i + 2] = row[j], row[j + 1], row[j + 2]
            row[j], row[j + 1], row[j + 2] = t0, t1, t2


class _CheckedDecode:
    """Mixin over FFCV's ResizedCropRGBImageDecoder: the same decode, crop and resize, plus the check; with a
    `seed`, each sample's crop and flip (probability `flip`) come from a generator seeded for that visit."""

    seed: int | None = None
    flip: float = 0.0

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        loop = Compiler.get_iterator()
        resize_c = Compiler.compile(resize_crop)
        crop_c = Compiler.compile(self.get_crop_generator)
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio
        m0, m1, m2 = MARK
        seeded, run_seed, flip = self.seed is not None, np.uint64(self.seed or 0), self.flip
        mix, flip_columns = Compiler.compile(_mix), Compiler.compile(_flip_columns)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in loop(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                failed = False
                if field["mode"] == jpg:
                    pixels = temp_storage[dst_ix]
                    # libjpeg-turbo through FFCV's C function itself (numba calls ctypes functions directly): a
                    # numba dispatcher of FFCV's Python wrapper per loader had its signature cache corrupted
                    # (KeyError in the finalizer of every run, and in the next loader's compilation)
                    failed = ctypes_imdecode(data.ctypes.data, data.size, height, width, pixels.ctypes.data, height,
                                             width, 0, 0, 1, 1, False, False) != 0
                    pixels = pixels.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    pixels = data.reshape(height, width, 3)
                out = destination[dst_ix]
                if failed:
                    half = out.shape[0] // 2
                    out[:half, :, 0], out[:half, :, 1], out[:half, :, 2] = m0, m1, m2
                    out[half:, :, 0] = source_ix % 256
                    out[half:, :, 1] = (source_ix // 256) % 256
                    out[half:, :, 2] = (source_ix // 65536) % 256
                else:
                    if seeded:  # the visit's own stream: the same crop in any thread, in any run
                        batch = mix(np.uint64(batch_indices[0]) + _GOLDEN * mix(np.uint64(batch_indices[-1])))
                        visit = mix(run_seed + _GOLDEN * mix(np.uint64(source_ix) + mix(batch + np.uint64(dst_ix))))
                        np.random.seed(np.uint32(visit >> np.uint64(32)))
                    i, j, h, w = crop_c(height, width, scale, ratio)
                    resize_c(pixels, i, i + h, j, j + w, out)
                    if flip > 0 and np.random.uniform(0.0, 1.0) < flip:
                        flip_columns(out)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class CheckedRandomResizedCrop(_CheckedDecode, RandomResizedCropRGBImageDecoder):
    def __init__(self, output_size, *, scale, ratio, seed: int, flip: float):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed, self.flip = seed, flip


class CheckedCenterCrop(_CheckedDecode, CenterCropRGBImageDecoder):
    pass


class MarkReader:
    """Reads the marker images of (B, 3, H, W) batches on their own device, so that checking a batch never makes
    the host wait: (failed (B,) bool, .beton sample index (B,) long, meaningful where failed). A batch is either
    raw uint8 pixels or normalised with `mean` and `std`; `normalise` turns a raw one into the normalised form."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = mean, std
        self._constants: dict = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # made once per device: a tensor built from Python values is a blocking copy on a GPU
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * 255,
                                       torch.tensor(self.std, device=device).view(1, 3, 1, 1) * 255,
                                       torch.tensor(MARK, dtype=torch.float32, device=device).view(1, 3))
        return self._constants[device]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """float32 (pixel - 255 mean) / (255 std) of a uint8 batch, in its memory format."""
        mean, std, _ = self._on(images.device)
        return (images.float() - mean) / std

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std, mark = self._on(images.device)
        # top-left and bottom-left pixels, (B, 3, 2), as views: indexing with [0, -1] builds an index tensor from
        # host data, a blocking copy on a GPU
        corners = torch.stack((images[:, :, 0, 0], images[:, :, -1, 0]), dim=2).float()
        pixels = corners if images.dtype == torch.uint8 else (corners * std[..., 0] + mean[..., 0]).round()
        failed = (pixels[:, :, 0] == mark).all(dim=1)
        rgb = pixels[:, :, 1].long()
        return failed, rgb[:, 0] + 256 * rgb[:, 1] + 65536 * rgb[:, 2]
