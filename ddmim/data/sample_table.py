"""A listing's samples, (path, label) each, held in a few flat arrays rather than as Python objects.

Ten million (path, label) tuples of str held 2.5 GiB, and a forked loader worker that reads them touches their
reference counts and so copies every page it reads (pytorch/pytorch#13246). Here each sample is its folder's
number, its name's bytes in one buffer and its label: a path is rebuilt when it is read, and the arrays hold no
object a worker would write to. A folder is the path up to its last separator (before any archive-member
part, `sample_refs`), kept once however many samples it holds.
"""
from __future__ import annotations

import os
from array import array
from collections.abc import Sequence

import numpy as np

from ddmim.data.sample_refs import SEP


class SampleTable(Sequence):
    def __init__(self, folders: list[str], folder_ids, names, ends, labels):
        self.folders = folders
        self.folder_ids = np.asarray(folder_ids, dtype=np.int32)
        self.names = np.frombuffer(names, dtype=np.uint8)  # a builder's bytearray is shared, not copied
        self.ends = np.asarray(ends, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.ends)

    def name_bytes(self, i: int) -> bytes:
        return self.names[self.ends[i - 1] if i else 0:self.ends[i]].tobytes()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.folders[self.folder_ids[i]] + os.fsdecode(self.name_bytes(i)), int(self.labels[i])

    def entries(self):
        """(folder number, a view of the name's bytes) of each sample, in order."""
        names, start = memoryview(self.names), 0
        for first in range(0, len(self), 2**16):  # as ints a block at a time: ten million ints take 360 MB
            block = slice(first, first + 2**16)
            for folder, end in zip(self.folder_ids[block].tolist(), self.ends[block].tolist()):
                yield folder, names[start:end]
                start = end

    def split(self, chosen) -> tuple[SampleTable, SampleTable]:
        """(the samples `chosen` marks false, those it marks true), each in this table's order."""
        mask = np.fromiter(chosen, dtype=bool, count=len(self))
        del chosen  # a generator may hold a copy of the names
        cuts = [0, *(np.flatnonzero(np.diff(mask)) + 1).tolist(), len(self)]  # runs of one side: few, val is sparse
        pieces = ([], [])
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b > a:  # views: the one copy is the concatenation
                pieces[int(mask[a])].append(self.names[self.ends[a - 1] if a else 0:self.ends[b - 1]])
        lengths = np.diff(self.ends, prepend=0)
        return tuple(SampleTable(self.folders, self.folder_ids[side],
                                 np.concatenate(pieces[pick]) if pieces[pick] else b"",
                                 np.cumsum(lengths[side]), self.labels[side])
                     for pick, side in ((0, ~mask), (1, mask)))

    def __reduce__(self):  # pickled for spawned workers: the arrays, not the samples
        return SampleTable, (self.folders, self.folder_ids, self.names.tobytes(), self.ends, self.labels)


class TableBuilder:
    """Samples appended one by one, into growing flat arrays."""

    def __init__(self):
        self.folders: list[str] = []
        self._folder_ids: dict[str, int] = {}
        self.ids, self.names, self.ends, self.labels = array("i"), bytearray(), array("q"), array("i")

    def folder(self, folder: str) -> int:
        """The number of a folder (its path with its trailing separator, or '' for bare names)."""
        if folder not in self._folder_ids:
            self._folder_ids[folder] = len(self.folders)
            self.folders.append(folder)
        return self._folder_ids[folder]

    def add_raw(self, folder_id: int, name: bytes, label: int) -> None:
        self.ids.append(folder_id)
        self.names += name
        self.ends.append(len(self.names))
        self.labels.append(label)

    def add_name(self, folder_id: int, name: str, label: int) -> None:
        self.add_raw(folder_id, os.fsencode(name), label)

    def add(self, path: str, label: int) -> None:
        head = path.split(SEP, 1)[0]
        cut = head.rfind(os.sep) + 1
        self.add_raw(self.folder(path[:cut]), os.fsencode(path[cut:]), label)

    def build(self) -> SampleTable:
        return SampleTable(self.folders, self.ids, self.names, self.ends, self.labels)


def table(samples) -> SampleTable:
    """A table of (path, label) pairs."""
    builder = TableBuilder()
    for path, label in samples:
        builder.add(path, label)
    return builder.build()
