"""Converts an ImageNet-layout folder into WebDataset tar shards that NVIDIA DALI reads, with their indexes.

    python data_prep/to_dali.py SRC DST [--max-resolution 512] [--jpeg-quality 90] [--shard-size 5000] ...

DST/<split>/shard-NNNNNN.tar holds, per image, `KEY.jpg` (an RGB JPEG) and `KEY.cls` (the label as one
little-endian int32: DALI's webdataset reader types it directly, where a text label would arrive as ASCII
bytes). Beside each shard, shard-NNNNNN.idx is its index in DALI's wds2idx format, and shard-NNNNNN.crc the
CRC-32 of each sample's JPEG (`KEY CRC` lines): DALI decodes through damaged compressed data without an
error, so the loader checks the bytes against these once (see ddmim/data/dali_repair.py).

The train samples are shuffled once (seeded by --seed) before they are cut into shards: DALI's reader
shuffles only within a buffer of a few thousand samples, so shards written class after class would give
batches of one or two classes. Val keeps the source order (class by class), which evaluation reads as is.
Each image is decoded once, in a worker process: a file that does not decode is skipped and listed in
DST/skipped.tsv; an RGB JPEG within --max-resolution is stored byte for byte.

A split is built in DST/.<split>.partial/, shard by shard, and renamed into place when complete. A killed
conversion resumes from its last complete shard when run again with the same options.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import struct
import sys
import tarfile
import zlib
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from data_prep.conversion import (
    SplitResult,
    Workers,
    add_common_options,
    check_common_options,
    clear_stale,
    convert,
    run_cli,
)
from data_prep.images import BadImage, jpeg_bytes
from ddmim.atomic import atomic_path, owner_alive, owner_tag, publish, write_text
from ddmim.data.dali_format import CHECKSUMS, INDEX, MANIFEST, shard_name
from ddmim.data.sample_refs import shown
from ddmim.errors import UserError

PLAN = "plan.json"
OWNER = "owner"


def encode(item: tuple[str, int], max_resolution: int, quality: int) -> tuple[bytes | None, str | None]:
    try:
        return jpeg_bytes(item[0], max_resolution, quality), None
    except BadImage as exc:
        return None, str(exc)
    except OSError as exc:  # unreadable file (permissions, vanished): skipped like an undecodable one
        return None, f"{type(exc).__name__}: {exc}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, first_key: int, samples, encoded) -> tuple[int, list[tuple[str, str]]]:
    """One shard and its index, each complete or absent (both absent when none of its files decodes); returns
    (samples written, skipped)."""
    from wds2idx import IndexCreator  # shipped with DALI: its own index format, written by its own tool

    index, sums = path.with_suffix(INDEX), path.with_suffix(CHECKSUMS)
    written, skipped, lines = 0, [], []
    # renamed into place in reverse order, the tar last: a shard is complete once its tar is there
    with atomic_path(path) as tmp, atomic_path(index) as index_tmp, atomic_path(sums) as sums_tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, ((source, label), (data, reason)) in enumerate(zip(samples, encoded)):
                if data is None:
                    skipped.append((shown(source), reason))
                    continue
                key = f"{first_key + offset:09d}"  # the position in the shuffled plan: unique, stable on resume
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.cls", struct.pack("<i", label))
                lines.append(f"{key} {zlib.crc32(data):08x}\n")
                written += 1
        if written:  # DALI's index tool refuses an empty tar, and a reader has nothing to read in one
            with IndexCreator(str(tmp), str(index_tmp), verbose=False) as creator:
                creator.create_index()
            sums_tmp.write_text("".join(lines))
        else:
            tmp.unlink()
    return written, skipped


def open_partial(final: Path, plan: dict, overwrite: bool) -> Path:
    """The split's work folder: a killed run's one is resumed when its plan is this one."""
    partial_dir = final.with_name(f".{final.name}.partial")
    clear_stale(final)  # temporaries of the older, pid-named layout
    if partial_dir.is_dir():
        owner = (partial_dir / OWNER).read_text().strip() if (partial_dir / OWNER).is_file() else ""
        if owner and owner_alive(owner):
            raise UserError(f"another conversion (process {owner}) is writing {partial_dir}")
        old = json.loads((partial_dir / PLAN).read_text()) if (partial_dir / PLAN).is_file() else None
        if old != plan:
            if not overwrite:
                raise UserError(f"{partial_dir} holds a killed conversion made with other options or sources; "
                                      "rerun it with the same options to resume, or pass --overwrite to start over")
            shutil.rmtree(partial_dir)
        for tmp in partial_dir.glob(".*"):  # the killed run's unfinished files: every one is hidden
            tmp.unlink()
    partial_dir.mkdir(parents=True, exist_ok=True)
    (partial_dir / OWNER).write_text(owner_tag())
    write_text(partial_dir / PLAN, json.dumps(plan))
    return partial_dir


def write_split(split: str, files: list, final: Path, args, pool) -> SplitResult:
    order = list(files)
    if split == "train":
        random.Random(args.seed).shuffle(order)
    shards = [order[i:i + args.shard_size] for i in range(0, len(order), args.shard_size)]
    plan = {"files": hashlib.sha256(json.dumps(order).encode()).hexdigest(), "shard_size": args.shard_size,
            "max_resolution": args.max_resolution, "jpeg_quality": args.jpeg_quality, "seed": args.seed}
    work = open_partial(final, plan, args.overwrite)
    # a shard is done once its report is written, after its tar and index: a kill between the two redoes it
    done = [i for i in range(len(shards)) if (work / shard_name(i)).with_suffix(".json").is_file()]
    if done:
        print(f"{split}: resuming a killed conversion, {len(done)} of {len(shards)} shards already written",
              file=sys.stderr)
    encoder = partial(encode, max_resolution=args.max_resolution, quality=args.jpeg_quality)
    result = SplitResult(split)
    for number, samples in enumerate(shards):
        path = work / shard_name(number)
        report = path.with_suffix(".json")
        if number not in done:
            encoded = pool.imap(encoder, samples, f"{split} shard {number + 1}/{len(shards)}")
            written, skipped = write_shard(path, number * args.shard_size, samples, encoded)
            write_text(report, json.dumps({"written": written, "skipped": skipped}))
        counts = json.loads(report.read_text())
        result.written += counts["written"]
        result.skipped += [tuple(s) for s in counts["skipped"]]
        result.bytes += path.stat().st_size if path.exists() else 0
    if not result.written:
        raise UserError(f"none of the {len(files)} files of {split} decodes (their reasons: {work}/*.json)")
    for leftover in [work / OWNER, work / PLAN, *work.glob("shard-*.json")]:
        leftover.unlink()
    manifest = {"shuffled": split == "train", "seed": args.seed, "samples": result.written,
                "max_resolution": args.max_resolution}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
    publish(work, final)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard (default 5000)")
    args = parser.parse_args(argv)
    check_common_options(args)
    if args.shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    pool = Workers(args.workers)
    try:
        convert(args, "dali", lambda split: args.dst / split,
                lambda split, files, final: write_split(split, files, final, args, pool))
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
