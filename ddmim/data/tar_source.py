"""WebDataset shards (tar archives written by any tool) as a source of samples.

A sample is a run of consecutive members sharing a key: the member's name up to the first dot of its file name
(WebDataset's rule: `a/b.c.jpg` has key `a/b` and extension `c.jpg`). Its image is the first member whose
extension is an image's (`jpg`, `jpeg`, `png`, `webp`, ..., in any case), its label the text of a `cls` member
if it has one. A sample stands in a listing as a reference to its image's bytes inside the archive
(`sample_refs`): the folder loader and both converters read it as they read a file. A sample without an image,
and an archive that cannot be read to its end, are listed as not read, never dropped silently.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import BinaryIO

from ddmim.data.label_files import class_name, number_classes
from ddmim.data.listing import LABELED_LAYOUTS, UNLABELED, SplitListing, split_off_val
from ddmim.data.pixels import EXTENSIONS
from ddmim.data.sample_refs import member
from ddmim.data.sample_table import table
from ddmim.errors import UserError

IMAGE_EXTENSIONS = frozenset(e[1:] for e in EXTENSIONS)
LABEL_EXTENSION = "cls"


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, by WebDataset's rule."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def shard_files(root: Path) -> dict[str, list[Path]]:
    """The shards of a WebDataset source per split: ROOT/train/*.tar (and ROOT/val/*.tar), else ROOT/*.tar as
    the train split, or ROOT itself when it is a .tar file; empty when ROOT is none of these."""
    root = Path(root)
    if root.is_file():
        return {"train": [root]} if root.suffix == ".tar" else {}
    splits = {split: sorted((root / split).glob("*.tar")) for split in ("train", "val") if (root / split).is_dir()}
    if splits.get("train"):
        return {split: tars for split, tars in splits.items() if tars}
    top = sorted(p for p in root.glob("*.tar") if p.is_file())
    return {"train": top} if top else {}


def list_shards(tars: list[Path]) -> tuple[list[tuple[str, str | None, str]], list[tuple[str, str]]]:
    """((image reference, label text or None, key) per sample, (where, reason) of what was not read)."""
    samples, ignored = [], []
    for tar in tars:
        try:
            _list_shard(str(tar), samples, ignored)
        except (tarfile.TarError, OSError) as exc:
            ignored.append((str(tar), f"not readable as a tar archive from here on ({type(exc).__name__}: {exc}): "
                                      "its remaining samples are not read"))
    return samples, ignored


def _list_shard(tar: str, samples: list, ignored: list) -> None:
    # labels are read through a second handle: the archive's own position is tarfile's
    with tarfile.open(tar, mode="r:") as archive, open(tar, "rb") as labels:
        group: list[tarfile.TarInfo] = []
        end = 0  # where the last member's data ends
        for info in archive:
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not info.isfile():
                continue
            if os.path.basename(info.name).startswith("."):
                ignored.append((f"{tar}:{info.name}", "hidden: not read"))
                continue
            if group and split_name(info.name)[0] != split_name(group[0].name)[0]:
                _add_sample(tar, labels, group, samples, ignored)
                group = []
            group.append(info)
        labels.seek(end)
        if labels.read(2**20).strip(b"\0"):  # tarfile ends quietly at a header cut short; a real end is zeros
            raise tarfile.ReadError(f"the archive ends inside a header after {end} bytes")
        if group:
            _add_sample(tar, labels, group, samples, ignored)


def _add_sample(tar: str, labels: BinaryIO, group: list[tarfile.TarInfo], samples: list, ignored: list) -> None:
    key = split_name(group[0].name)[0]
    by_extension = {split_name(info.name)[1].lower(): info for info in group}
    image = next((info for info in group if split_name(info.name)[1].lower() in IMAGE_EXTENSIONS), None)
    if image is None:
        ignored.append((f"{tar}:{key}", f"a sample without an image member ({', '.join(by_extension)}): not read"))
        return
    label = None
    if LABEL_EXTENSION in by_extension:
        info = by_extension[LABEL_EXTENSION]
        labels.seek(info.offset_data)
        try:
            label = labels.read(info.size).decode("ascii").strip()
        except UnicodeDecodeError:
            raise UserError(f"{tar}: {info.name} is not a label in text (WebDataset's cls); a folder that "
                            "data_prep/to_dali.py wrote is read with --format dali") from None
    samples.append((member(tar, image.offset_data, image.size, image.name), label, key))


def wds_splits(root: Path, val_fraction: float, labels: bool, known: list[str] | None,
               hold_out: str) -> tuple[list[str], SplitListing, SplitListing]:
    """`source_splits` of WebDataset shards (`tar_source`): labelled when every sample has a cls; without val
    shards a sample is held out by its key, which re-sharding keeps."""
    shards = shard_files(root)
    if not shards:
        raise UserError(f"--data-layout wds: {root} holds no .tar shards (expected {root}/*.tar, "
                        f"{root}/train/*.tar or a .tar file)")
    listed = {split: list_shards(tars) for split, tars in shards.items()}
    texts = {label for samples, _ in listed.values() for _, label, _ in samples}
    labeled = bool(texts) and None not in texts
    if labels and not labeled:
        raise UserError(f"{root}: not every sample of its shards has a label (a cls member): this needs "
                        f"{LABELED_LAYOUTS}")
    classes = (known or number_classes({label for _, label, _ in listed["train"][0]})) if labeled else []
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for split in ("train", "val"):
        samples, ignored = listed.get(split, ([], []))
        unknown = sorted({class_name(t) for _, t, _ in samples} - set(index)) if labeled else []
        if unknown:
            raise UserError(f"{root}: {split} samples are labelled {', '.join(unknown[:5])}, classes the train "
                            f"split lacks")
        splits[split] = SplitListing(table((ref, index[class_name(text)] if labeled else UNLABELED)
                                           for ref, text, _ in samples), ignored)
    train, val = splits["train"], splits["val"]
    if "val" not in shards and (hold_out == "always" or (hold_out == "unlabeled" and not labeled)):
        train, val = split_off_val(train, root, val_fraction, [key for _, _, key in listed["train"][0]])
    return classes, train, val
