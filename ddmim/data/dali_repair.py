"""Finding the samples of DALI shards that do not decode, and index files that leave them out.

DALI's webdataset reader reads only the samples its index lists, so a filtered copy of an index is the
way to skip a sample without touching the shards. The copies live in a temporary folder of this process.

Two searches. `damaged_samples` runs before DALI first sees the shards: it walks each JPEG's header
(`jpeg_header`), since some header damage kills DALI's decoder with SIGSEGV, and checks each JPEG's bytes
against the CRC-32 the converter wrote beside the shard (SHARD.crc), since DALI decodes damaged compressed
data into a wrong image without an error. Shards of older converters, without checksums, get the header walk
only (a few hundred bytes a sample). What a shard holds is remembered in the user's cache by path, size and
modification time, so a data set is read in full once. `undecodable_samples` decodes every sample with PIL,
after DALI failed on a batch.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ddmim.atomic import write_text
from ddmim.data.dali_format import CHECKSUMS, Shards, index_entries, read_checksums
from ddmim.data.jpeg_header import OTHER_FORMATS, header_fault
from ddmim.user_cache import user_cache

HEADER_READ = 4096  # bytes read at once at each sample's start: most JPEG headers end within them


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


def _check_stored(job: tuple[str, str]) -> list[tuple[str, str]]:
    """(key, reason) of each sample of one shard whose header is malformed or whose bytes are not the ones
    the converter wrote."""
    tar, index = job
    checksums, bad = read_checksums(tar), []
    with open(tar, "rb") as f:
        for key, offset, size in index_entries(index):
            f.seek(offset)
            head = f.read(size if checksums is not None else min(size, HEADER_READ))

            def read(at: int, count: int) -> bytes:
                if at + count <= len(head):
                    return head[at:at + count]
                f.seek(offset + at)
                return f.read(max(0, min(count, size - at)))

            reason = None if head.startswith(OTHER_FORMATS) else header_fault(read, size)
            if reason:
                bad.append((key, f"damaged JPEG header: {reason}"))
            elif checksums is not None and zlib.crc32(head) != checksums.get(key):
                bad.append((key, "its bytes differ from the ones written (CRC-32)"))
    return bad


def _cache_file(tar: str) -> Path:
    return user_cache("dali-scans") / f"{hashlib.sha256(os.path.realpath(tar).encode()).hexdigest()[:32]}.json"


def _check_remembered(job: tuple[str, str]) -> list[tuple[str, str]]:
    """`_check_stored`, read from the cache when the shard, its index and its checksums are unchanged."""
    tar = job[0]
    stamp = [[os.stat(p).st_size, os.stat(p).st_mtime_ns] if os.path.exists(p) else None
             for p in (tar, job[1], str(Path(tar).with_suffix(CHECKSUMS)))]
    cache = _cache_file(tar)
    try:
        remembered = json.loads(cache.read_text())
        if remembered["stamp"] == stamp and remembered["tar"] == os.path.realpath(tar):
            return [tuple(entry) for entry in remembered["bad"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no entry, or one of another format: read the shard
    bad = _check_stored(job)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text(cache, json.dumps({"tar": os.path.realpath(tar), "stamp": stamp, "bad": bad}))
    except OSError:
        pass  # a read-only cache costs a full read next time, nothing else
    return bad




def undecodable_samples(shards: Shards, own: Shards) -> list[tuple[int, str, str]]:
    """(ordinal in the split, 'SHARD.tar:KEY', reason) of every sample of `shards` whose JPEG does not decode;
    ordinals count the samples of the split's `own` shards, which `shards` may be a filtered part of."""
    return _named(shards, own, _check_shard)


def damaged_samples(shards: Shards, own: Shards, share: int = 1) -> list[tuple[int, str, str]]:
    """Like `undecodable_samples`, for the samples whose JPEG header is malformed or whose bytes fail their
    checksum, without decoding; `share`: the ranks that check at once on this process's cores."""
    return _named(shards, own, _check_remembered, max(1, len(usable_cores()) // share))


def usable_cores() -> frozenset[int]:
    """The cores this process may run on: a launcher (SLURM, numactl) may bind each rank to a few of them."""
    return frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset(
        range(os.cpu_count() or 1))


def ranks_sharing_cores(mine: tuple[str, frozenset[int]], every_rank: list[tuple[str, frozenset[int]]]) -> int:
    """How many ranks (this one included) check on this rank's cores, from each rank's (host, usable cores): the
    ranks of the same host whose cores overlap. Not the world size: 8 nodes of 8 ranks would give each rank
    1/64 of its machine; nor the host's rank count where a launcher bound each rank to cores of its own."""
    host, cores = mine
    return max(1, sum(1 for other_host, other in every_rank if other_host == host and other & cores))


def _named(shards: Shards, own: Shards, check, workers: int | None = None) -> list[tuple[int, str, str]]:
    # threads: reading, CRC-32 and PIL's decoding release the GIL, and a thread neither imports the caller's
    # script again (as a spawned process does: an unguarded script then fails, one read from standard input
    # respawned workers for ever) nor dies without its error reaching the caller
    jobs = list(zip(*shards))
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = list(pool.map(check, jobs))
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


def filtered_shards(tars: list[str], indexes: list[str], leave_out: set[str],
                    trained: np.ndarray | None = None) -> tuple[list[str], list[str]]:
    """(tars, copies of their indexes) without the samples named 'SHARD.tar:KEY' in `leave_out`, nor those whose
    ordinal (over the split's own `tars`) is set in `trained`; a shard left with no sample is dropped."""
    folder = tempfile.mkdtemp(prefix="ddmim-dali-index-")
    _FOLDERS.append(folder)
    kept_tars, kept_indexes, count = [], [], 0
    for n, (tar, index) in enumerate(zip(tars, indexes)):
        lines = Path(index).read_text().splitlines()
        done = trained[count:count + len(lines) - 1] if trained is not None else np.zeros(len(lines) - 1, bool)
        count += len(lines) - 1
        kept = [line for line, was in zip(lines[1:], done)
                if not was and f"{tar}:{line.split()[3].rsplit('.', 1)[0]}" not in leave_out]
        if not kept:
            continue
        path = Path(folder) / f"{n:06d}-{Path(index).name}"
        path.write_text(f"{lines[0].split()[0]} {len(kept)}\n" + "".join(f"{line}\n" for line in kept))
        kept_tars.append(tar)
        kept_indexes.append(str(path))
    return kept_tars, kept_indexes
