"""A sample of a listing is a file's path or a reference to a member of a tar archive (`tar_source`): both are
strings, read here alike, so the folder loader and the converters need not know which they hold."""
from __future__ import annotations

import io
import os
from typing import BinaryIO

SEP = "\0"  # never part of a file name, so a reference can never be mistaken for a path


def member(tar: str, offset: int, size: int, name: str) -> str:
    return SEP.join((tar, str(offset), str(size), name))


def is_member(ref: str) -> bool:
    return SEP in ref


def shown(ref: str) -> str:
    """How a sample is named to a person: its path, or ARCHIVE:MEMBER."""
    if not is_member(ref):
        return ref
    tar, _, _, name = ref.split(SEP)
    return f"{tar}:{name}"


def read_sample(ref: str) -> bytes:
    """The bytes of a file or of an archive member."""
    if not is_member(ref):
        with open(ref, "rb") as f:
            return f.read()
    tar, offset, size, name = ref.split(SEP)
    with open(tar, "rb") as f:
        f.seek(int(offset))
        data = f.read(int(size))
    if len(data) != int(size):
        raise OSError(f"{tar} ends inside its member {name}")
    return data


def open_sample(ref: str) -> BinaryIO:
    return io.BytesIO(read_sample(ref)) if is_member(ref) else open(ref, "rb")


def sample_size(ref: str) -> int:
    return int(ref.split(SEP)[2]) if is_member(ref) else os.path.getsize(ref)
