"""A folder source's listing kept between starts, so that a second start (a resume, each rank of a run, a
conversion after training) reads no directory: ten million files take about 35 s to list, their cached
listing a second to load.

A listing is kept in the user's cache (`ddmim/listings/`), under a hash of the source's absolute path and
the options that shape it. It holds the modification time and inode of every folder it read: adding,
removing or renaming a file changes its folder's time, so a listing is used only while every one of its
folders is as it was. A listing is kept only when no folder changed from two seconds before listing began
(filesystems that count time in whole seconds could otherwise hide a change made while it was read), and
only for sources of `CACHED_FROM` samples or more, which take long enough to list to be worth a file. Of the
ranks that a launcher such as torchrun starts together on a machine, only the first (LOCAL_RANK 0) writes it:
eight copies of a 300 MB file would all be the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddmim.atomic import atomic_write
from ddmim.data.listing import SplitListing
from ddmim.data.sample_table import SampleTable
from ddmim.user_cache import user_cache

CACHED_FROM = 10_000
SETTLED_S = 2.0
VERSION = 1
SPLITS = ("train", "val")


def cache_file(root: Path, options: dict) -> Path:
    key = json.dumps({"version": VERSION, "root": os.path.abspath(root), **options}, sort_keys=True)
    return user_cache("listings") / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def cached_splits(root: Path, options: dict, list_splits: Callable[[], tuple[tuple, bool]]) -> tuple:
    """(classes, train listing, val listing) of the folder source `root` from the cache, else from
    `list_splits()`, which also says whether its listing may be kept; `options`: what else the listing depends
    on (JSON values)."""
    path = cache_file(root, options)
    kept = _load(path, root)
    if kept is not None:
        return kept
    began = time.time()
    result, keep = list_splits()
    first_rank = os.environ.get("LOCAL_RANK", "0") == "0"
    if keep and first_rank and sum(len(listing.files) for listing in result[1:]) >= CACHED_FROM:
        _store(path, root, result, began)
    return result


def _folders(root: Path, listings) -> list[str]:
    extra = [os.path.join(str(root), name, "") for name in ("", *SPLITS) if (root / name).is_dir()]
    return sorted({*extra, *(folder for listing in listings for folder in listing.files.folders)})


def _store(path: Path, root: Path, result: tuple, began: float) -> None:
    classes, *listings = result
    prefix = os.path.join(str(root), "")
    folders = _folders(root, listings)
    paths = [folder for listing in listings for folder in listing.files.folders]
    paths += [p for listing in listings for p, _ in listing.ignored]
    if not all(p.startswith(prefix) for p in paths):
        return  # a path spelled outside the source: not kept
    try:
        stats = [os.stat(folder) for folder in folders]
    except OSError:
        return
    if any(s.st_mtime > began - SETTLED_S for s in stats):
        return
    meta = {"classes": classes, "folders": [f[len(prefix):] for f in folders],
            "times": [[s.st_mtime_ns, s.st_ino] for s in stats]}
    arrays = {}
    for split, listing in zip(SPLITS, listings):
        files = listing.files
        meta[split] = {"folders": [f[len(prefix):] for f in files.folders],
                       "ignored": [[p[len(prefix):], why] for p, why in listing.ignored]}
        arrays.update({f"{split}_ids": files.folder_ids, f"{split}_names": files.names,
                       f"{split}_ends": files.ends, f"{split}_labels": files.labels})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
    except OSError:
        pass  # a cache that cannot be written (a full or read-only home) costs the next start its listing only


def _load(path: Path, root: Path) -> tuple | None:
    prefix = os.path.join(str(root), "")
    try:
        with np.load(path, allow_pickle=False) as kept:
            arrays = {name: kept[name] for name in kept.files}
        meta = json.loads(arrays["meta"].tobytes())
        for folder, (mtime_ns, inode) in zip(meta["folders"], meta["times"]):
            status = os.stat(prefix + folder)
            if (status.st_mtime_ns, status.st_ino) != (mtime_ns, inode):
                return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # none kept, a folder gone, or a file cut short
    listings = [SplitListing(SampleTable([prefix + f for f in meta[split]["folders"]], arrays[f"{split}_ids"],
                                         arrays[f"{split}_names"], arrays[f"{split}_ends"],
                                         arrays[f"{split}_labels"]),
                             [(prefix + p, why) for p, why in meta[split]["ignored"]])
                for split in SPLITS]
    return (meta["classes"], *listings)
