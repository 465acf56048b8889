"""Finding the samples of DALI shards that do not decode, and index files that leave them out.

DALI's webdataset reader reads only the samples its index lists, so a filtered copy of an index is the
way to skip a sample without touching the shards. The copies live in a temporary folder of this process.
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


def undecodable_samples(tars: list[str], indexes: list[str], original: list[str]) -> list[tuple[int, str, str]]:
    """(ordinal in the split, 'SHARD.tar:KEY', reason) of every listed sample whose JPEG does not decode;
    ordinals count the samples of the `original` indexes (the shards' own)."""
    jobs = list(zip(tars, indexes))
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            found = pool.map(_check_shard, jobs)
    else:
        found = [_check_shard(job) for job in jobs]
    ordinals, count = {}, 0
    for tar, index in zip(tars, original):
        entries = index_entries(index)
        for i, (key, _, _) in enumerate(entries):
            ordinals[f"{Path(tar).name}:{key}"] = count + i
        count += len(entries)
    return [(ordinals[f"{Path(tar).name}:{key}"], f"{tar}:{key}", reason)
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
