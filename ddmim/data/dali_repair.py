"""Finding the samples of DALI shards that do not decode, and index files that leave them out.

DALI's webdataset reader reads only the samples its index lists, so a filtered copy of an index is the
way to skip a sample without touching the shards. The copies live in a temporary folder of this process.

Two searches: `damaged_headers` reads only each JPEG's header (a few hundred bytes), before DALI first
sees the shards, since some header damage kills DALI's decoder with SIGSEGV; `undecodable_samples`
decodes every sample with PIL, after DALI failed on a batch.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing as mp
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from ddmim.data.jpeg_header import header_fault

HEADER_READ = 4096  # bytes read at once at each sample's start: most JPEG headers end within them


def index_entries(index: str) -> list[tuple[str, int, int]]:
    """(key, offset, size) of each sample's JPEG in a wds2idx index."""
    entries = []
    for line in Path(index).read_text().splitlines()[1:]:
        fields = line.split()
        for ext, offset, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4]):
            if ext == "jpg":
                entries.append((name.rsplit(".", 1)[0], int(offset), int(size)))
    return entries


def _check_shard(job: tuple[str, str]) -> list[tuple[str, str]]:
    tar, index = job
    bad = []
    with open(tar, "rb") as f:
        for key, offset, size in index_entries(index):
            f.seek(offset)
            try:
                with Image.open(io.BytesIO(f.read(size))) as image:
                    image.load()
            except Exception as exc:  # any failure to decode marks the sample
                bad.append((key, f"{type(exc).__name__}: {exc}"))
    return bad


def _check_headers(job: tuple[str, str]) -> list[tuple[str, str]]:
    tar, index = job
    bad = []
    with open(tar, "rb") as f:
        for key, offset, size in index_entries(index):
            f.seek(offset)
            head = f.read(min(size, HEADER_READ))

            def read(at: int, count: int) -> bytes:
                if at + count <= len(head):
                    return head[at:at + count]
                f.seek(offset + at)
                return f.read(max(0, min(count, size - at)))

            reason = header_fault(read, size)
            if reason:
                bad.append((key, f"damaged JPEG header: {reason}"))
    return bad


def _each_shard(check, jobs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            return pool.map(check, jobs)
    return [check(job) for job in jobs]


Shards = tuple[list[str], list[str]]  # (tars, their indexes)


def undecodable_samples(shards: Shards, own: Shards) -> list[tuple[int, str, str]]:
    """(ordinal in the split, 'SHARD.tar:KEY', reason) of every sample of `shards` whose JPEG does not decode;
    ordinals count the samples of the split's `own` shards, which `shards` may be a filtered part of."""
    return _named(shards, own, _check_shard)


def damaged_headers(shards: Shards, own: Shards) -> list[tuple[int, str, str]]:
    """Like `undecodable_samples`, for the samples whose JPEG header is malformed (`jpeg_header`); reads only
    the headers."""
    return _named(shards, own, _check_headers)


def _named(shards: Shards, own: Shards, check) -> list[tuple[int, str, str]]:
    jobs = list(zip(*shards))
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            found = pool.map(check, jobs)
    else:
        found = [check(job) for job in jobs]
    ordinals, count = {}, 0
    for tar, index in zip(*own):
        entries = index_entries(index)
        for i, (key, _, _) in enumerate(entries):
            ordinals[f"{tar}:{key}"] = count + i
        count += len(entries)
    return [(ordinals[f"{tar}:{key}"], f"{tar}:{key}", reason)
            for (tar, _), failures in zip(jobs, found) for key, reason in failures]


_FOLDERS: list[str] = []


@atexit.register
def _remove_folders() -> None:
    for folder in _FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


def filtered_shards(tars: list[str], indexes: list[str], leave_out: set[str]) -> tuple[list[str], list[str]]:
    """(tars, copies of their indexes) without the samples named 'SHARD.tar:KEY' in `leave_out`; a shard
    left with no sample is dropped."""
    folder = tempfile.mkdtemp(prefix="ddmim-dali-index-")
    _FOLDERS.append(folder)
    kept_tars, kept_indexes = [], []
    for n, (tar, index) in enumerate(zip(tars, indexes)):
        lines = Path(index).read_text().splitlines()
        kept = [line for line in lines[1:] if f"{tar}:{line.split()[3].rsplit('.', 1)[0]}" not in leave_out]
        if not kept:
            continue
        path = Path(folder) / f"{n:06d}-{Path(index).name}"
        path.write_text(f"{lines[0].split()[0]} {len(kept)}\n" + "".join(f"{line}\n" for line in kept))
        kept_tars.append(tar)
        kept_indexes.append(str(path))
    return kept_tars, kept_indexes
