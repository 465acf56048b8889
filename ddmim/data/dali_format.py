"""What a DALI split on disk is, for the converter that writes it and the loader that reads it.

DST/<split>/ holds WebDataset shards `shard-NNNNNN.tar` (`KEY.jpg`, `KEY.cls`: the label as one little-endian
int32), beside each its index in DALI's wds2idx format (`.idx`, whose first line is 'v1.2 SAMPLES') and the CRC-32
of each JPEG (`.crc`, 'KEY CRC32' per line), and `conversion.json`, how the shards were written ("shuffled").
A view of another tool's shards (`dali_view`) has links to them, indexes and no `cls` members: its labels are
`labels.npy`, one per sample in the order of the indexes.
"""
from __future__ import annotations

import json
from pathlib import Path

from ddmim.errors import UserError, say

INDEX = ".idx"
CHECKSUMS = ".crc"
MANIFEST = "conversion.json"
HOST_LABELS = "labels.npy"

Shards = tuple[list[str], list[str]]  # (tars, their indexes)


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def index_header(index) -> list[str]:
    """The first line of a wds2idx index ('v1.2 SAMPLES'), read alone: an ImageNet index has 5,000 lines."""
    with open(index, errors="replace") as f:
        return f.readline().split()


def index_entries(index: str) -> list[tuple[str, int, int]]:
    """(key, offset, size) of each sample's JPEG in a wds2idx index."""
    entries = []
    for line in Path(index).read_text().splitlines()[1:]:
        fields = line.split()
        for ext, offset, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4]):
            if ext == "jpg":
                entries.append((name.rsplit(".", 1)[0], int(offset), int(size)))
    return entries


def read_checksums(tar: str) -> dict[str, int] | None:
    """KEY -> CRC-32 of each JPEG of a shard; None for a shard of an older converter, which wrote none."""
    path = Path(tar).with_suffix(CHECKSUMS)
    if not path.is_file():
        return None
    return {key: int(crc, 16) for key, crc in (line.split() for line in path.read_text().splitlines())}


def is_dali_conversion(root: Path) -> bool:
    """`root` holds a DALI split as the converter (or a shard view) writes it: a manifest, or indexed shards in
    train/. Shards without indexes are WebDataset shards of another tool."""
    train = Path(root) / "train"
    return (train / MANIFEST).is_file() or any(t.with_suffix(INDEX).is_file() for t in train.glob("*.tar"))


def list_shards(folder: Path) -> Shards:
    if not folder.is_dir():
        raise UserError(f"DALI shard folder {folder} does not exist (make it with data_prep/to_dali.py)")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise UserError(f"{folder} holds no .tar shards (make them with data_prep/to_dali.py)")
    indexes = [t.with_suffix(INDEX) for t in tars]
    for tar, idx in zip(tars, indexes):
        if not idx.is_file():
            raise UserError(f"shard {tar} has no index {idx.name} (data_prep/to_dali.py writes both); WebDataset "
                            "shards of another tool are read with --format folder or dali on the folder that holds "
                            "them, or converted by to_dali.py")
        head = index_header(idx)
        if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
            raise UserError(f"{idx} is not a DALI webdataset index (wds2idx format)")
        with open(tar, "rb") as f:
            f.seek(257)
            if f.read(5) != b"ustar":
                raise UserError(f"{tar} is not a tar archive")
    return [str(t) for t in tars], [str(i) for i in indexes]


def sample_count(indexes: list[str]) -> int:
    return sum(int(index_header(i)[1]) for i in indexes)


def check_shuffled(folder: Path) -> None:
    """Shards of the converter before it shuffled are in class order: say what that does to batches."""
    manifest = folder / MANIFEST
    written = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if written.get("view_of"):
        if not written.get("shuffled"):
            say(f"ddmim: warning: the shards of {written['view_of']} hold their samples in class order; each batch "
                "will hold few classes. data_prep/to_dali.py converts them shuffled.")
    elif not written.get("shuffled"):
        say(f"ddmim: warning: {folder} was written in class order (by an older data_prep/to_dali.py); each "
            "batch will hold few classes. Convert it again.")
