"""What an image is, in every format (the folder loader and both converters): 8-bit RGB.

PIL's own conversion to RGB clips a 16-bit grey image (mode I;16, or I) at 255, so a full-range gradient
comes out almost white; here its values are scaled to 8 bits instead. Animated images (GIF, WebP) give
their first frame. The extensions the folder loader reads are torchvision's plus GIF, which the converters
keep too.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ddmim.data.sample_refs import open_sample

# torchvision's IMG_EXTENSIONS (spelled out: the converters' worker processes need not import torchvision) and GIF
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB version of a decoded image; 16-bit grey values are scaled, not clipped."""
    if image.mode in WIDE_GREY:
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "I" or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Opens, fully decodes and converts one file or archive member (the folder loader's loader)."""
    with open_sample(path) as f, Image.open(f) as image:
        image.load()
        return rgb(image)
