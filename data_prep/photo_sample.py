"""Builds a photograph data set of ImageNet-like JPEGs for loader benchmarks and tests.

    python data_prep/photo_sample.py DST [--train 2000] [--val 200]

Each image is a random crop of one of scikit-image's seven colour sample photographs (the class), resized
so its long side is 400-500 px, randomly mirrored and saved as a JPEG of quality 90: real photographic
content at ImageNet's typical size and compression, never noise.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ddmim.atomic import staged_folder

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _make_one(job: tuple[int, str, str], dst: Path, seed: int) -> None:
    index, split, name = job
    rng = np.random.default_rng([seed, index])
    photo = _photo(name)
    w, h = photo.size
    area = rng.uniform(0.3, 1.0) * w * h
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    crop = photo.crop((x, y, x + cw, y + ch))
    scale = rng.uniform(400, 500) / max(cw, ch)
    crop = crop.resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    crop.save(dst / split / name / f"{index:06d}.JPEG", quality=90)


def build_photo_dataset(dst: Path, n_train: int = 2000, n_val: int = 200, seed: int = 0,
                        workers: int | None = None) -> Path:
    """Writes DST/{train,val}/<photo>/*.JPEG once; an existing complete set is reused."""
    dst = Path(dst)
    if (dst / "train").is_dir() and (dst / "val").is_dir():
        return dst
    with staged_folder(dst) as tmp:
        jobs = []
        for split, count in (("train", n_train), ("val", n_val)):
            for name in PHOTOS:
                (tmp / split / name).mkdir(parents=True)
            jobs += [(len(jobs) + i, split, PHOTOS[i % len(PHOTOS)]) for i in range(count)]
        # threads (PIL resizes and encodes without the GIL): no process that imports the caller's script again
        with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            list(pool.map(partial(_make_one, dst=tmp, seed=seed), jobs))
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = build_photo_dataset(args.dst, args.train, args.val, args.seed)
    print(f"photo data set at {root}: {args.train} train and {args.val} val JPEGs, {len(PHOTOS)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
