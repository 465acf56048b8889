"""Builds the built-in sample data set: scikit-learn's 1,797 scanned handwritten digits (real 8x8
grey-level images of 10 classes) as 32x32 RGB PNGs in ImageFolder layout, with a train/val split: the data of
`ddmim demo` and of `ddmim train` without --data."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ddmim.atomic import staged_folder
from ddmim.user_cache import user_cache

SIZE = 32
VAL_EVERY = 5  # every 5th image of each class goes to val/: a 80/20 split stratified by class


def default_sample_root() -> Path:
    return user_cache("sample-digits")


def build_unlabeled_sample(labeled: Path, dst: Path) -> Path:
    """The same digits without classes or splits, in eight folders (DST/part<k>/<n>.png), once: the shape of a
    photo collection without labels."""
    dst = Path(dst)
    if dst.is_dir():
        return dst
    with staged_folder(dst) as tmp:
        for n, image in enumerate(sorted(Path(labeled).rglob("*.png"))):
            folder = tmp / f"part{n % 8}"
            folder.mkdir(exist_ok=True)
            shutil.copyfile(image, folder / f"{n:04d}.png")
    return dst


def build_sample_dataset(dst: Path) -> Path:
    """Writes DST/{train,val}/<digit>/<index>.png once; an existing complete set is reused."""
    from sklearn.datasets import load_digits

    dst = Path(dst)
    if (dst / "train").is_dir() and (dst / "val").is_dir():
        return dst
    digits = load_digits()
    with staged_folder(dst) as tmp:
        seen: dict[int, int] = {}
        for index, (image, label) in enumerate(zip(digits.images, digits.target)):
            label = int(label)
            seen[label] = seen.get(label, 0) + 1
            split = "val" if seen[label] % VAL_EVERY == 0 else "train"
            grey = (image / 16.0 * 255.0).round().astype(np.uint8)
            rgb = Image.fromarray(grey, mode="L").resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            rgb.save(folder / f"{index:04d}.png")
    return dst
