"""FFCV's crop decoders, made to tell when a stored JPEG does not decode.

FFCV's own decoders ignore libjpeg-turbo's return code, so damaged bytes in a .beton become a garbage
image that trains silently. These decoders check it. A sample that fails comes out as a marker image: its
top half one fixed colour, its bottom half the sample's index in base 256 (R + 256 G + 65536 B). Both
survive flips and normalisation, so `find_failures` can name the sample from the finished batch.
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


def find_failures(images: torch.Tensor, mean: list[float], std: list[float]) -> dict[int, int]:
    """{position in the batch: .beton sample index} of the marker images in a normalised (B, 3, H, W) batch."""
    corners = images[:, :, [0, -1], 0].float()  # (B, 3, 2): top-left and bottom-left pixels
    m = torch.tensor(mean, device=images.device).view(1, 3, 1) * 255
    s = torch.tensor(std, device=images.device).view(1, 3, 1) * 255
    pixels = (corners * s + m).round().cpu()
    marked = (pixels[:, :, 0] == torch.tensor(MARK, dtype=pixels.dtype)).all(dim=1)
    found = {}
    for position in marked.nonzero().flatten().tolist():
        r, g, b = pixels[position, :, 1].long().tolist()
        found[position] = r + 256 * g + 65536 * b
    return found
