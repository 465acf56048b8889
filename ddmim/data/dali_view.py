"""WebDataset shards of another tool, read by the DALI loader through a view of them in the user's cache.

DALI reads a split through wds2idx indexes (`dali_format`); shards of another writer have none, name their images
with any image extension and keep a label as text, which DALI cannot read as a number. The view is a folder per
split holding a link to each shard (under its own name), an index per shard that names each sample's image
(the member the folder loader reads, `tar_source`) as its `jpg`, and `HOST_LABELS`, each sample's label in the
order of the indexes, which the loader gives the batches by the samples' names. Split and labels are the folder
loader's (`wds_splits`), so every format trains on the same images with the same labels.

A view is made once per set of shards (their paths, sizes and modification times) and held-out fraction; a rank
that finds another's finished view uses it. Ten million samples make indexes of about 300 MB.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ddmim.atomic import temp_path
from ddmim.data.dali_format import HOST_LABELS, INDEX, MANIFEST, is_dali_conversion
from ddmim.data.layout import CLASSES_FILE
from ddmim.data.listing import SplitListing
from ddmim.data.sample_refs import SEP
from ddmim.data.tar_source import shard_files, split_name, wds_splits
from ddmim.errors import say
from ddmim.user_cache import user_cache

VERSION = 1
UNREADABLE = (b"GIF8",)  # images the folder loader reads and DALI's decoders do not


def dali_root(root: Path, val_fraction: float) -> Path:
    """`root` when it is a DALI conversion (or not shards at all), else the view of its shards."""
    root = Path(root)
    if is_dali_conversion(root):
        return root
    return shard_view(root, val_fraction) if shard_files(root) else root


def shard_view(root: Path, val_fraction: float) -> Path:
    """The view of the shards under `root`, made now if there is none for them yet."""
    tars = [tar for split in shard_files(root).values() for tar in split]
    shards = [(os.path.realpath(tar), os.stat(tar).st_size, os.stat(tar).st_mtime_ns) for tar in tars]
    key = json.dumps({"version": VERSION, "root": os.path.abspath(root), "val_fraction": val_fraction,
                      "shards": shards})
    view = user_cache("dali-views") / hashlib.sha256(key.encode()).hexdigest()[:32]
    if (view / "train" / MANIFEST).is_file():
        return view
    classes, *listings = wds_splits(root, val_fraction, labels=False, known=None, hold_out="always")
    view.parent.mkdir(parents=True, exist_ok=True)
    work = temp_path(view)
    try:
        work.mkdir()
        for split, listing in zip(("train", "val"), listings):
            if len(listing.files):
                _write_split(work / split, listing, root)
        (work / CLASSES_FILE).write_text(json.dumps({name: i for i, name in enumerate(classes)}))
        try:
            os.rename(work, view)
        except OSError:
            if not (view / "train" / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"ddmim: DALI reads the shards of {root} through {view}")
    return view


def _write_split(folder: Path, listing: SplitListing, root: Path) -> None:
    folder.mkdir()
    by_tar: dict[str, list[tuple[str, str, str, int]]] = {}
    for ref, label in listing.files:
        tar, offset, size, name = ref.split(SEP)
        by_tar.setdefault(tar, []).append((offset, size, name, label))
    labels, unreadable = [], 0
    for tar, samples in by_tar.items():
        link = folder / Path(tar).name
        os.symlink(os.path.realpath(tar), link)
        lines = []
        with open(tar, "rb") as f:
            for offset, size, name, label in samples:
                f.seek(int(offset))
                if f.read(4).startswith(UNREADABLE):
                    unreadable += 1
                    continue
                key = "_".join(split_name(name)[0].split())  # an index line is split at whitespace
                lines.append(f"jpg {offset} {size} {key}.jpg")
                labels.append(label)
        if not lines:  # DALI's reader takes no shard without samples
            link.unlink()
            continue
        link.with_suffix(INDEX).write_text("\n".join([f"v1.2 {len(lines)}", *lines]) + "\n")
    if unreadable:
        say(f"ddmim: {unreadable} images of {root} are GIFs, which DALI does not decode: not read (the folder "
            "loader reads them)")
    np.save(folder / HOST_LABELS, np.asarray(labels, dtype=np.int64))
    ordered = len(set(labels)) > 1 and all(a <= b for a, b in zip(labels, labels[1:]))
    (folder / MANIFEST).write_text(json.dumps({"shuffled": not ordered, "view_of": str(root)}))
