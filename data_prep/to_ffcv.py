"""Converts an ImageNet-layout folder into one FFCV .beton per split, plus classes.json and skipped.tsv.

    python data_prep/to_ffcv.py SRC DST [--max-resolution 512] [--jpeg-quality 90] [--write-mode jpg] ...

DST/train.beton and DST/val.beton hold `image` (RGBImageField) and `label` (IntField), and exactly the files
that decode: any FFCV pipeline can read them. Each image is decoded once, inside FFCV's writer processes. A
file that does not decode cannot be left out there (FFCV numbers the samples before writing them), so it is
written as an 8 x 8 placeholder and listed in DST/skipped.tsv; before the file is published, its sample is
taken out of the .beton's tables (`drop_samples`), leaving only unreferenced bytes in the data pages.

Each .beton is written under a temporary name and renamed when complete, so an interrupted run leaves
nothing that looks finished; an existing output is replaced only with --overwrite, and only once its
successor is complete. FFCV's format cannot be appended to, so a killed conversion starts its split over
(the next run removes the killed one's temporary file).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from data_prep.conversion import (
    SplitResult,
    add_common_options,
    check_common_options,
    clear_stale,
    convert,
    run_cli,
)
from data_prep.images import BadImage, decode
from ddmim.atomic import publish, temp_path
from ddmim.data.sample_refs import shown
from ddmim.errors import UserError

PLACEHOLDER_LABEL = -1
PLACEHOLDER = np.zeros((8, 8, 3), dtype=np.uint8)


class DecodedImages:
    """The indexed data set FFCV's writer processes read: (RGB uint8 array, label) per file, decoded once.

    Each writer process sends its error output to a log of its own (read back if the process dies, so the
    converter can end with one line) and lists the files it could not decode in a report of its own."""

    def __init__(self, samples: list[tuple[str, int]], max_resolution: int, logs: Path):
        self.samples, self.max_resolution, self.logs = samples, max_resolution, logs
        self._pid = None

    def __len__(self) -> int:
        return len(self.samples)

    def _enter_process(self) -> None:
        self._pid = os.getpid()
        log = os.open(self.logs / f"stderr-{self._pid}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 2)
        os.close(log)

    def __getitem__(self, index: int):
        if self._pid != os.getpid():
            self._enter_process()
        path, label = self.samples[index]
        try:
            return decode(path, self.max_resolution)[0], label
        except (BadImage, OSError) as exc:
            with open(self.logs / f"skipped-{self._pid}.tsv", "a") as report:
                report.write(f"{index}\t{shown(path)}\t{exc}\n")
            return PLACEHOLDER, PLACEHOLDER_LABEL


def _death_reason(logs: Path, process: mp.Process) -> str:
    """The last line a dead writer process wrote, or what can be told without it (its log may not fit on a
    full disk)."""
    log = logs / f"stderr-{process.pid}.log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    if lines:
        return lines[-1].strip()
    full = shutil.disk_usage(logs).free < 2**20
    return (f"an FFCV writer process died (exit code {process.exitcode})"
            + (": No space left on device" if full else ""))


class _WriterDied(Exception):
    """Raised in the main thread by the watcher's signal."""


def _writer_died(signum, frame):
    raise _WriterDied


def run_writer(writer, dataset: DecodedImages, chunksize: int = 64) -> None:
    """FFCV's writer, watched: its main loop waits forever for a worker that died (a full disk, say), so a
    thread watches the workers and interrupts the writer when one dies; the conversion then ends with that
    worker's last error line. (The writer runs in the main thread: numba forbids forking from another.)

    The interruption is a real signal, since only a signal ends the writer's blocking queue read, and a
    signal of its own (SIGUSR1) with a handler installed here: SIGINT, used before, is ignored in a job
    that a shell starts in the background (`nohup ... &`), where every full-disk run then hung."""
    failure: list[str] = []
    done = threading.Event()

    def watch():
        workers: dict[int, mp.Process] = {}
        while not done.wait(0.2):
            try:
                workers.update({p.pid: p for p in mp.active_children()})
            except RuntimeError:  # a worker started during the listing: look again next time
                continue
            dead = [p for p in workers.values() if p.exitcode not in (None, 0)]
            if dead:
                failure.append(_death_reason(dataset.logs, dead[0]))
                for p in workers.values():
                    p.terminate()
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGUSR1, _writer_died)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
    except _WriterDied:
        shared = getattr(writer, "metadata_sm", None)
        if shared is not None:
            shared.unlink()
        raise OSError(failure[0]) from None
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)


def drop_samples(path: Path, drop: set[int]) -> None:
    """Takes samples out of a finished .beton in place: the header's count, the metadata table (one row per
    sample, after the header and field descriptors) and the allocation table (sample id, pointer, size of each
    piece of data, at the end of the file) are written again without them, the later samples renumbered.
    Their image bytes stay in the data pages, which only the two tables point into."""
    if not drop:
        return
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    reader = Reader(str(path))
    keep = np.ones(int(reader.num_samples), dtype=bool)
    keep[sorted(drop)] = False
    renumber = np.cumsum(keep) - 1
    table = reader.alloc_table[keep[reader.alloc_table["sample_id"]]].copy()
    table["sample_id"] = renumber[table["sample_id"]]
    header = np.array([reader.header], dtype=HeaderType)
    header["num_samples"] = int(keep.sum())
    with open(path, "r+b") as f:
        f.seek(HeaderType.itemsize + reader.field_descriptors.nbytes)
        f.write(reader.metadata[keep].tobytes())
        f.seek(int(header["alloc_table_ptr"][0]))
        f.write(table.tobytes())
        f.truncate()
        f.seek(0)
        f.write(header.tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_beton(path: Path, samples, args) -> SplitResult:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode=args.write_mode, max_resolution=args.max_resolution,
                               jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                               smart_threshold=args.smart_threshold),
        "label": IntField(),
    }
    logs = path.with_name(path.name + ".logs")  # beside the temporary .beton, removed with it by a later run
    logs.mkdir()
    try:
        run_writer(DatasetWriter(str(path), fields, num_workers=args.workers),
                   DecodedImages(samples, args.max_resolution, logs))
        skipped = sorted(line.rstrip("\n").split("\t") for report in logs.glob("skipped-*.tsv")
                         for line in report.open())
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    skipped.sort(key=lambda row: int(row[0]))
    drop_samples(path, {int(index) for index, _, _ in skipped})
    return SplitResult("", written=len(samples) - len(skipped), skipped=[(p, r) for _, p, r in skipped],
                       bytes=path.stat().st_size)


def write_split(split: str, files: list, final: Path, args) -> SplitResult:
    clear_stale(final)
    tmp = temp_path(final)
    try:
        result = write_beton(tmp, files, args)
        if not result.written:
            path, reason = result.skipped[0]
            raise UserError(f"none of the {len(files)} files of {split} decodes (e.g. {path}: {reason})")
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(tmp.with_name(tmp.name + ".logs"), ignore_errors=True)
    result.name = split
    return result


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
        raise UserError(f"--compress-probability must be in [0, 1], got {args.compress_probability}")
    if args.write_mode == "smart" and args.smart_threshold is None:
        args.smart_threshold = args.max_resolution * args.max_resolution * 3 // 2

    convert(args, "ffcv", lambda split: args.dst / f"{split}.beton",
            lambda split, files, final: write_split(split, files, final, args))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
