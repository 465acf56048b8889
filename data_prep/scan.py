"""The scanning and validation step both converters share, and their common options and bookkeeping.

A source is an ImageNet-layout folder: SRC/<split>/<class>/<image>. Labels follow torchvision's
ImageFolder (class folders sorted by name, numbered from 0, taken from the train split). Every file is
decoded in full by a worker process: one that cannot be decoded (truncated, empty, not an image) is
skipped and reported with the reason; every decodable one is converted to 3-channel RGB by the writers.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm import tqdm

SPLITS = ("train", "val")


class ConversionError(Exception):
    """A problem with the user's input or destination: printed as one line, exit code 2."""


@dataclass
class SplitScan:
    name: str
    samples: list[tuple[str, int]]  # (path, label) of every valid image
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="source folder with train/<class>/* and/or val/<class>/*")
    parser.add_argument("dst", type=Path, help="output folder")
    parser.add_argument("--max-resolution", type=int, default=512,
                        help="longest side of a stored image, in pixels; larger images are downscaled (default 512)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    parser.add_argument("--subset", type=int, help="convert only this many images per split (a seeded random "
                        "choice, for quick runs)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), help="splits to convert (default train val)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier finished run")


def check_common_options(args: argparse.Namespace) -> None:
    if not args.src.is_dir():
        raise ConversionError(f"source {args.src} does not exist or is not a folder")
    if args.max_resolution < 16:
        raise ConversionError(f"--max-resolution must be at least 16, got {args.max_resolution}")
    if not 1 <= args.jpeg_quality <= 100:
        raise ConversionError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    if args.workers < 1:
        raise ConversionError(f"--workers must be at least 1, got {args.workers}")
    if args.subset is not None and args.subset < 1:
        raise ConversionError(f"--subset must be at least 1, got {args.subset}")


def class_index(src: Path, splits: list[str]) -> list[str]:
    """Class folder names in label order; every split must use classes of the first split found."""
    found = [s for s in splits if (src / s).is_dir()]
    if not found:
        raise ConversionError(f"source {src} has none of the split folders {', '.join(splits)}")
    classes = sorted(e.name for e in os.scandir(src / found[0]) if e.is_dir())
    if not classes:
        raise ConversionError(f"{src / found[0]} has no class folders (expected {src}/{found[0]}/<class>/<image>)")
    for split in found[1:]:
        extra = sorted({e.name for e in os.scandir(src / split) if e.is_dir()} - set(classes))
        if extra:
            raise ConversionError(f"{src / split} has class folders not in {found[0]}/: {', '.join(extra[:5])}")
    return classes


def list_split(src: Path, split: str, classes: list[str], subset: int | None, seed: int = 0) -> list[tuple[str, int]]:
    files = []
    for label, name in enumerate(classes):
        folder = src / split / name
        if folder.is_dir():
            files += [(str(folder / f), label) for f in sorted(os.listdir(folder)) if (folder / f).is_file()]
    if subset is not None and subset < len(files):
        files = sorted(random.Random(seed).sample(files, subset), key=lambda item: item[0])
    return files


def load_rgb(path: str, max_resolution: int) -> Image.Image:
    """Decodes the whole file (so truncation is caught), converts any mode to RGB, bounds the longest side."""
    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
    if max(rgb.size) > max_resolution:
        scale = max_resolution / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.LANCZOS)
    return rgb


def check_image(item: tuple[str, int]) -> tuple[str, int, str | None]:
    path, label = item
    if os.path.getsize(path) == 0:
        return path, label, "empty file"
    try:
        with Image.open(path) as img:
            img.load()
            img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad files; each one is a reason to skip
        return path, label, f"{type(exc).__name__}: {exc}".replace("\t", " ").replace("\n", " ")
    return path, label, None


def pool_map(fn, items, workers: int, desc: str):
    """Ordered map over worker processes with a progress bar."""
    if workers == 1 or len(items) < 2:
        yield from tqdm(map(fn, items), total=len(items), desc=desc, unit="img", file=sys.stderr)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from tqdm(pool.imap(fn, items, chunksize=16), total=len(items), desc=desc, unit="img", file=sys.stderr)


def scan(src: Path, splits: list[str], subset: int | None, workers: int) -> tuple[list[str], list[SplitScan]]:
    classes = class_index(src, splits)
    scans = []
    for split in splits:
        if not (src / split).is_dir():
            print(f"no {split}/ folder in {src}: skipping that split", file=sys.stderr)
            continue
        result = SplitScan(split, [])
        for path, label, reason in pool_map(check_image, list_split(src, split, classes, subset), workers,
                                            f"checking {split}"):
            if reason is None:
                result.samples.append((path, label))
            else:
                result.skipped.append((path, reason))
        if not result.samples:
            raise ConversionError(f"{src / split} holds no readable images")
        scans.append(result)
    return classes, scans


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConversionError(f"{existing[0]} already exists; pass --overwrite to replace it")


def temp_path(final: Path) -> Path:
    """Where an output is built before it is renamed into place: a name no loader accepts."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def publish(tmp: Path, final: Path) -> None:
    """Moves a finished output into place; the old output (if --overwrite) is removed only now."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json_atomic(path: Path, payload) -> None:
    tmp = temp_path(path)
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def write_report(dst: Path, classes: list[str], scans: list[SplitScan], written_bytes: int, seconds: float,
                 backend: str) -> None:
    """classes.json (folder name -> label), skipped.tsv, and the closing summary line."""
    write_json_atomic(dst / "classes.json", {name: label for label, name in enumerate(classes)})
    skipped = [(s.name, path, reason) for s in scans for path, reason in s.skipped]
    tmp = temp_path(dst / "skipped.tsv")
    tmp.write_text("split\tpath\treason\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in skipped))
    os.replace(tmp, dst / "skipped.tsv")
    written = sum(len(s.samples) for s in scans)
    per_split = ", ".join(f"{s.name} {len(s.samples)}" for s in scans)
    print(f"{backend}: wrote {written} images ({per_split}), skipped {len(skipped)} (see {dst / 'skipped.tsv'}), "
          f"{written_bytes / 2**20:.1f} MiB, {written / max(seconds, 1e-9):.0f} images/s")


def convert(args: argparse.Namespace, backend: str, final_for: Callable[[str], Path],
            write: Callable[[Path, list], int]) -> None:
    """The converters' common run: refuse finished outputs, scan and validate, then per split write to a
    temporary name (`write` returns the bytes written) and rename it into place; finally the report."""
    refuse_existing([final_for(s) for s in args.splits], args.overwrite)
    args.dst.mkdir(parents=True, exist_ok=True)
    with Timer() as timer:
        classes, scans = scan(args.src, args.splits, args.subset, args.workers)
        written = 0
        for split in scans:
            final = final_for(split.name)
            tmp = temp_path(final)
            try:
                written += write(tmp, split.samples)
                publish(tmp, final)
            finally:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
    write_report(args.dst, classes, scans, written, timer.seconds, backend)


def run_cli(main_fn, argv=None) -> int:
    try:
        return main_fn(argv)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are untouched, unfinished ones were not published", file=sys.stderr)
        return 130


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
