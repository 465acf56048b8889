"""What both converters share: options, the source listing, temporary outputs, the closing report.

Outputs are built under a hidden temporary name beside their final name and renamed into place when
complete, so nothing a loader accepts is ever half-written. A temporary output whose process is gone (a
killed run) is removed by the next run, which says so; one whose process still runs makes the next run
refuse. Errors a user can cause (bad paths or options, a full disk) end in one line and exit code 2.
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
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ddmim.atomic import OLD_MARK, TMP_MARK, owner_alive, write_text
from ddmim.data.layout import CLASSES_FILE, LAYOUTS, read_classes_file, source_splits
from ddmim.errors import UserError

SPLITS = ("train", "val")


@dataclass
class SplitResult:
    name: str
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    bytes: int = 0


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="source folder: train/<class>/* and val/<class>/*, any tree of "
                        "images without labels, WebDataset .tar shards, or a file list")
    parser.add_argument("dst", type=Path, help="output folder")
    parser.add_argument("--max-resolution", type=int, default=512,
                        help="longest side of a stored image, in pixels; larger images are downscaled (default 512)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    parser.add_argument("--subset", type=int, help="convert only this many images per split (a seeded random "
                        "choice, for quick runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --subset and of the DALI sample order")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS,
                        help="splits to convert (default train val); labels always follow the train split's classes")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier finished run")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="imagefolder (class folders), unlabeled "
                        "(any tree of images), list (a file of path[,label] lines) or wds (WebDataset .tar shards); "
                        "default auto, told from what is there")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="where the source has no val/ split, the "
                        "share of images held out for it, by a hash of each path (default 0.01, as training's)")


def check_common_options(args: argparse.Namespace) -> None:
    if not args.src.exists():
        raise UserError(f"source {args.src} does not exist")
    if args.dst.exists() and not args.dst.is_dir():
        raise UserError(f"output {args.dst} exists and is not a folder")
    if args.max_resolution < 16:
        raise UserError(f"--max-resolution must be at least 16, got {args.max_resolution}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.subset is not None and args.subset < 1:
        raise UserError(f"--subset must be at least 1, got {args.subset}")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")


def source_listing(args: argparse.Namespace) -> tuple[list[str], dict[str, tuple[list, list]]]:
    """The classes (none for an unlabeled source) and, per split asked for, ((path, label) files, (path,
    reason) not read). An unlabeled tree's val split is the images `ddmim.data.layout` holds out (as training
    does); class folders without val/ give none."""
    classes, train, val = source_splits(args.src, args.layout, args.val_fraction, known=read_classes_file(args.dst),
                                        extensions=None, hold_out="unlabeled")
    splits = {}
    for split, listing in (("train", train), ("val", val)):
        if split not in args.splits:
            continue
        files = listing.files
        if not files and (split == "val" or args.src.is_file() or not (args.src / split).is_dir()):
            print(f"no {split} images in {args.src}: skipping that split", file=sys.stderr)
            continue
        if args.subset is not None and args.subset < len(files):
            files = sorted(random.Random(args.seed).sample(files, args.subset), key=lambda item: item[0])
        if not files:
            raise UserError(f"{args.src / split} holds no files in its class folders")
        splits[split] = (files, listing.ignored)
    if not splits:
        raise UserError(f"source {args.src} has none of the split folders {', '.join(args.splits)}")
    return classes, splits


def clear_stale(final: Path, keep: Path | None = None) -> None:
    """Removes temporary outputs for `final` left by killed runs (and says so); refuses while one is live. An
    earlier output that a killed publish had set aside (only where the filesystem cannot swap two folders) is
    put back in place when `final` is missing, never deleted."""
    for tmp in sorted(final.parent.glob(f".{final.name}{TMP_MARK}*")) + sorted(
            final.parent.glob(f".{final.name}{OLD_MARK}*")):
        if tmp == keep or not (tmp.exists() or tmp.is_symlink()):
            continue
        mark = TMP_MARK if TMP_MARK in tmp.name else OLD_MARK
        alive = owner_alive(tmp.name.split(mark, 1)[1])
        if alive is None:
            raise UserError(f"{tmp} was left by a conversion on another host (or of unknown origin); "
                                  "delete it if that run is over")
        if alive:
            raise UserError(f"another conversion (process {tmp.name.split(':')[-1]}) is writing {tmp}")
        if mark == OLD_MARK and not final.exists():
            os.replace(tmp, final)
            print(f"put back {final}, set aside by a conversion that was killed while replacing it", file=sys.stderr)
            continue
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
        print(f"removed {tmp}, left by a conversion that was killed", file=sys.stderr)


class Workers:
    """Decoding in worker processes (forked where the platform can: they start at once and need no imports; on
    a 2,000-image set a spawned pool's start-up took a third of the run), or in this process for one worker.

    `imap` is an ordered map over chunks of items, a few chunks per worker in flight. A consumer that stops
    early (a full disk) then leaves only those to finish, and `close` never waits on a pipe filled with results:
    with `multiprocessing.Pool.imap` and its chunks of ~350 KB results, `Pool.terminate()` deadlocked in 3 of 22
    full-disk runs (CPython's python/cpython#96995, #78178). Here a manager thread of concurrent.futures reads
    every result as it comes. Chunks, not single items: one future per image cost the DALI converter 10% of its
    time at 2 workers (benchmarks/compare_converters.py)."""

    CHUNK = 8
    CHUNKS_IN_FLIGHT_PER_WORKER = 2

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = None
        if workers > 1:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.executor = ProcessPoolExecutor(workers, mp_context=mp.get_context(method))
            self.executor.submit(int).result()  # forks every worker now, before a progress bar starts a thread

    def imap(self, fn, items, desc: str):
        """fn(item) for each item in order, with a progress bar."""
        bar = tqdm(total=len(items), desc=desc, unit="img", file=sys.stderr, mininterval=1.0)
        pending: deque = deque()
        try:
            if self.executor is None:
                for item in items:
                    yield fn(item)
                    bar.update()
                return
            in_flight = self.CHUNKS_IN_FLIGHT_PER_WORKER * self.workers
            size = max(1, min(self.CHUNK, len(items) // in_flight))  # a small list still reaches every worker
            todo = iter(items)

            def submit_next() -> None:
                chunk = list(islice(todo, size))
                if chunk:
                    pending.append(self.executor.submit(_map_chunk, fn, chunk))

            for _ in range(in_flight):
                submit_next()
            while pending:
                try:
                    results = pending.popleft().result()
                except BrokenProcessPool:  # a worker killed (out of memory, a signal): said once, not respawned
                    raise UserError(f"a worker process of the conversion died while decoding images (the "
                                    f"system may be out of memory); run it again with fewer --workers than "
                                    f"{self.workers}") from None
                submit_next()
                for result in results:
                    yield result
                    bar.update()
        finally:
            for future in pending:
                future.cancel()
            bar.close()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _map_chunk(fn, chunk: list) -> list:
    return [fn(item) for item in chunk]


def write_report(dst: Path, classes: list[str], results: list[SplitResult], seconds: float, backend: str) -> None:
    """classes.json (folder name -> label), skipped.tsv (rows of splits not converted now are kept), summary line."""
    if read_classes_file(dst) is None:
        write_text(dst / CLASSES_FILE, json.dumps({name: label for label, name in enumerate(classes)}, indent=2))
    report = dst / "skipped.tsv"
    done = {r.name for r in results}
    kept = []
    if report.is_file():
        kept = [line for line in report.read_text().splitlines()[1:] if line.split("\t", 1)[0] not in done]
    rows = kept + [f"{r.name}\t{path}\t{reason}" for r in results for path, reason in r.skipped]
    write_text(report, "split\tpath\treason\n" + "".join(f"{row}\n" for row in rows))
    written = sum(r.written for r in results)
    skipped = sum(len(r.skipped) for r in results)
    per_split = ", ".join(f"{r.name} {r.written}" for r in results)
    print(f"{backend}: wrote {written} images ({per_split}), skipped {skipped} (see {report}), "
          f"{sum(r.bytes for r in results) / 2**20:.1f} MiB, {written / max(seconds, 1e-9):.0f} images/s")


def convert(args: argparse.Namespace, backend: str, final_for: Callable[[str], Path],
            write: Callable[[str, list, Path], SplitResult]) -> None:
    """The converters' common run: refuse finished outputs, list the source, then per split let `write` build
    the split (from its files, into the final path's temporary sibling) and publish it; finally the report."""
    existing = [final_for(s) for s in args.splits if final_for(s).exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    classes, splits = source_listing(args)
    try:
        args.dst.mkdir(parents=True, exist_ok=True)
        results = []
        for split, (files, ignored) in splits.items():
            result = write(split, files, final_for(split))
            result.skipped = ignored + result.skipped
            results.append(result)
        write_report(args.dst, classes, results, time.perf_counter() - start, backend)
    except OSError as exc:  # a full disk, a read-only destination: one line, and no partial output published
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(f"writing into {args.dst} failed: {exc.strerror or exc}{where}") from None


def close_progress_bars() -> None:
    """Clears the bars of interrupted loops (ours and FFCV's), so an error starts a line of its own."""
    for bar in list(tqdm._instances):
        bar.leave = False
        bar.close()


def run_cli(main_fn, argv=None) -> int:
    try:
        return main_fn(argv)
    except UserError as exc:
        close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are untouched, unfinished ones were not published", file=sys.stderr)
        return 130
