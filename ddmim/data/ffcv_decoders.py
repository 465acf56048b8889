"""FFCV's crop decoders, made to tell when a stored JPEG does not decode.

FFCV's own decoders ignore libjpeg-turbo's return code, so damaged bytes in a .beton become a garbage
image that trains silently. These decoders check it. A sample that fails comes out as a marker image: its
top half one fixed colour, its bottom half the sample's index in base 256 (R + 256 G + 65536 B). Both
survive flips and normalisation, so `MarkReader` can name the sample from the finished batch.
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


class _CheckedDecode:
    """Mixin over FFCV's ResizedCropRGBImageDecoder: the same decode, crop and resize, plus the check."""

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        loop = Compiler.get_iterator()
        resize_c = Compiler.compile(resize_crop)
        crop_c = Compiler.compile(self.get_crop_generator)
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio
        m0, m1, m2 = MARK

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
                    i, j, h, w = crop_c(height, width, scale, ratio)
                    resize_c(pixels, i, i + h, j, j + w, out)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class CheckedRandomResizedCrop(_CheckedDecode, RandomResizedCropRGBImageDecoder):
    pass


class CheckedCenterCrop(_CheckedDecode, CenterCropRGBImageDecoder):
    pass


class MarkReader:
    """Reads the marker images of normalised (B, 3, H, W) batches on their own device, so that checking a batch
    never makes the host wait: (failed (B,) bool, .beton sample index (B,) long, meaningful where failed)."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = mean, std
        self._constants: dict = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # made once per device: a tensor built from Python values is a blocking copy on a GPU
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1) * 255,
                                       torch.tensor(self.std, device=device).view(1, 3, 1) * 255,
                                       torch.tensor(MARK, dtype=torch.float32, device=device).view(1, 3))
        return self._constants[device]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std, mark = self._on(images.device)
        corners = images[:, :, [0, -1], 0].float()  # (B, 3, 2): top-left and bottom-left pixels
        pixels = (corners * std + mean).round()
        failed = (pixels[:, :, 0] == mark).all(dim=1)
        rgb = pixels[:, :, 1].long()
        return failed, rgb[:, 0] + 256 * rgb[:, 1] + 65536 * rgb[:, 2]
