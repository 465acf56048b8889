"""One source image, decoded once: the decode that validates it is the decode the writers store.

A file that cannot be decoded in full (empty, truncated, not an image) raises `BadImage` with the reason;
any decodable one comes out as a 3-channel RGB array with its longest side at most `max_resolution`.
Shrinking uses OpenCV's INTER_AREA, the filter FFCV's own writer uses (and the faster one: PIL's
antialiased bilinear took about twice as long per image), when OpenCV is installed (FFCV brings it).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ddmim.data import pixels
from ddmim.data.jpeg_header import bytes_fault
from ddmim.data.sample_refs import open_sample, read_sample, sample_size

try:
    import cv2
except ImportError:  # the DALI converter alone does not need OpenCV
    cv2 = None


class BadImage(Exception):
    """The reason a file is skipped, as one line."""


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\t", " ").replace("\n", " ")


def bounded_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    scale = min(1.0, max_resolution / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink(rgb: Image.Image, size: tuple[int, int]) -> np.ndarray:
    if cv2 is not None:
        return cv2.resize(np.asarray(rgb), size, interpolation=cv2.INTER_AREA)
    return np.asarray(rgb.resize(size, Image.BILINEAR, reducing_gap=2.0))


def decode(path: str, max_resolution: int) -> tuple[np.ndarray, bool]:
    """(RGB uint8 array bounded to max_resolution, whether the file's own bytes are that image as an RGB JPEG);
    `path`: a file, or a member of a tar archive (`tar_source`)."""
    if sample_size(path) == 0:
        raise BadImage("empty file")
    try:
        with open_sample(path) as f, Image.open(f) as img:
            size = bounded_size(*img.size, max_resolution)
            as_is = img.format == "JPEG" and img.mode == "RGB" and size == img.size
            if not as_is and size != img.size and img.format == "JPEG":
                # libjpeg decodes directly at 1/2, 1/4 or 1/8 scale when that still covers the target
                img.draft("RGB", size)
            img.load()  # the full decode: truncation shows here
            rgb = pixels.rgb(img)
    except Exception as exc:  # PIL raises many types for bad files; each one is a reason to skip
        raise BadImage(_reason(exc)) from None
    return (np.asarray(rgb) if rgb.size == size else _shrink(rgb, size)), as_is


def jpeg_bytes(path: str, max_resolution: int, quality: int) -> bytes:
    """The file's own bytes when it already is an RGB JPEG within bounds whose header the DALI loader accepts
    (`jpeg_header`: a header libjpeg reads through but the loader would leave out), else the re-encoded image."""
    pixels, as_is = decode(path, max_resolution)
    if as_is:
        data = read_sample(path)
        if bytes_fault(data) is None:
            return data
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
