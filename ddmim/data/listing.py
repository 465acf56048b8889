"""A source's samples, split into train and val: the listing every format's reader and both converters use.

A source without a val split of its own (an unlabeled tree, class folders with train/ alone, shards without
val/) holds out a fixed fraction of its images for validation, chosen by a hash of each file's path relative to
the source (`held_out`): the same images on every machine, every rank and after a resume, and an image added
later never moves another across the split.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ddmim.data.sample_table import SampleTable, table

UNLABELED = -2  # the label of every image of an unlabeled source (-1 marked undecodable samples in old .betons)
LABELED_LAYOUTS = ("ImageNet-style class folders (ROOT/train/<class>/<image>), WebDataset shards whose samples "
                   "all have a cls, or a converted set of them")


@dataclass
class SplitListing:
    files: SampleTable = field(default_factory=lambda: table(()))  # (path, label): class by class, sorted by name
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): sub-folders that were not read


def held_out(relative: str | bytes, fraction: float) -> bool:
    """Whether the file at `relative` (a path relative to the source, '/'-separated; bytes: its UTF-8, or the
    file system's bytes of a name that is not UTF-8) is a validation image."""
    data = relative.encode() if isinstance(relative, str) else relative
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def split_off_val(listing: SplitListing, root: Path, fraction: float,
                  keys: list[str] | None = None) -> tuple[SplitListing, SplitListing]:
    """(train, val) of a listing without a val split of its own; each file is held out by its path relative to
    `root`, or by its entry of `keys` (a file list's own spelling of it, a shard sample's key)."""
    files = listing.files
    if keys is None:
        prefix = os.path.join(str(root), "")
        relative = [os.fsencode(folder[len(prefix):].replace(os.sep, "/")) if folder.startswith(prefix) else
                    os.fsencode(Path(folder).relative_to(root).as_posix() + "/") for folder in files.folders]
        keys = (relative[folder] + name for folder, name in files.entries())
    train, val = files.split(held_out(key, fraction) for key in keys)
    return SplitListing(train, listing.ignored), SplitListing(val)
