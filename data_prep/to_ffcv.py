"""Converts an ImageNet-layout folder into one FFCV .beton per split, plus classes.json and skipped.tsv.

    python data_prep/to_ffcv.py SRC DST [--max-resolution 512] [--jpeg-quality 90] [--write-mode smart] ...

DST/train.beton and DST/val.beton hold `image` (RGBImageField) and `label` (IntField). Each is written
under a temporary name and renamed when complete, so an interrupted run leaves nothing that looks
finished; an existing output is replaced only with --overwrite, and only once its successor is complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_prep.scan import (
    ConversionError,
    add_common_options,
    check_common_options,
    convert,
    load_rgb,
    run_cli,
)


class ValidatedImages:
    """The indexed data set FFCV's writer reads: (RGB uint8 array, label) of each validated image."""

    def __init__(self, samples: list[tuple[str, int]], max_resolution: int):
        self.samples = samples
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return np.asarray(load_rgb(path, self.max_resolution)), label


def write_beton(path: Path, samples, args) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode=args.write_mode, max_resolution=args.max_resolution,
                               jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                               smart_threshold=args.smart_threshold),
        "label": IntField(),
    }
    DatasetWriter(str(path), fields, num_workers=args.workers).from_indexed_dataset(
        ValidatedImages(samples, args.max_resolution), chunksize=64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--write-mode", choices=["jpg", "raw", "smart", "proportion"], default="jpg",
                        help="jpg: every image JPEG; raw: uncompressed pixels; proportion: JPEG with probability "
                             "--compress-probability; smart: JPEG when raw would exceed --smart-threshold bytes")
    parser.add_argument("--compress-probability", type=float, default=0.5, help="for --write-mode proportion")
    parser.add_argument("--smart-threshold", type=int, help="for --write-mode smart: raw size in bytes above "
                        "which an image is JPEG-compressed (default: FFCV's)")
    args = parser.parse_args(argv)
    check_common_options(args)
    if not 0.0 <= args.compress_probability <= 1.0:
        raise ConversionError(f"--compress-probability must be in [0, 1], got {args.compress_probability}")
    if args.write_mode == "smart" and args.smart_threshold is None:
        args.smart_threshold = args.max_resolution * args.max_resolution * 3 // 2

    def write(tmp: Path, samples) -> int:
        write_beton(tmp, samples, args)
        return tmp.stat().st_size

    convert(args, "ffcv", lambda split: args.dst / f"{split}.beton", write)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
