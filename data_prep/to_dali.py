"""Converts an ImageNet-layout folder into WebDataset tar shards that NVIDIA DALI reads, with their indexes.

    python data_prep/to_dali.py SRC DST [--max-resolution 512] [--jpeg-quality 90] [--shard-size 5000] ...

DST/<split>/shard-NNNNNN.tar holds, per image, `KEY.jpg` (an RGB JPEG) and `KEY.cls` (the label as one
little-endian int32: DALI's webdataset reader types it directly, where a text label would arrive as ASCII
bytes). Beside each shard, shard-NNNNNN.idx is its index in DALI's wds2idx format. JPEGs that are already
RGB and within --max-resolution are stored byte for byte; everything else is converted and re-encoded.
A split is built in a temporary folder and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import io
import struct
import sys
import tarfile
from functools import partial
from pathlib import Path

from PIL import Image

from data_prep.scan import (
    ConversionError,
    add_common_options,
    check_common_options,
    convert,
    load_rgb,
    pool_map,
    run_cli,
)


def jpeg_bytes(item: tuple[str, int], max_resolution: int, quality: int) -> bytes:
    path, _ = item
    with Image.open(path) as img:
        if img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= max_resolution:
            return Path(path).read_bytes()
    buffer = io.BytesIO()
    load_rgb(path, max_resolution).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, samples, args) -> int:
    """Writes the shards and their indexes into `folder`; returns the bytes written."""
    from wds2idx import IndexCreator  # shipped with DALI: its own index format, written by its own tool

    folder.mkdir(parents=True)
    encode = partial(jpeg_bytes, max_resolution=args.max_resolution, quality=args.jpeg_quality)
    shard, tar, shard_bytes, total = -1, None, 0, 0
    paths = []
    for index, ((_, label), data) in enumerate(zip(samples, pool_map(encode, samples, args.workers, "encoding"))):
        if tar is None or index % args.shard_size == 0 or shard_bytes > args.shard_max_mb * 2**20:
            if tar is not None:
                tar.close()
            shard += 1
            paths.append(folder / f"shard-{shard:06d}.tar")
            tar, shard_bytes = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT), 0
        key = f"{index:09d}"
        _add(tar, f"{key}.jpg", data)
        _add(tar, f"{key}.cls", struct.pack("<i", label))
        shard_bytes += len(data) + 1024
    tar.close()
    for path in paths:
        with IndexCreator(str(path), str(path.with_suffix(".idx")), verbose=False) as creator:
            creator.create_index()
        total += path.stat().st_size
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard at most (default 5000)")
    parser.add_argument("--shard-max-mb", type=int, default=512, help="start a new shard past this size in MiB "
                        "(default 512)")
    args = parser.parse_args(argv)
    check_common_options(args)
    if args.shard_size < 1 or args.shard_max_mb < 1:
        raise ConversionError("--shard-size and --shard-max-mb must be at least 1")

    convert(args, "dali", lambda split: args.dst / split, lambda tmp, samples: write_shards(tmp, samples, args))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
