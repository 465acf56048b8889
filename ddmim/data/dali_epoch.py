"""Which samples of a DALI split the current epoch has trained, so that a run resumed on another split of its
global batch (another process count or per-device batch) trains the rest of the epoch: each sample the epoch
has not trained, once, over the new ranks.

DALI deals each rank its own part of the shards and shuffles within it, so where a rank stood says nothing about
which samples it had read. The training pipeline therefore returns each sample's `source_info`
('SHARD.tar:OFFSET:KEY.jpg', as zero-padded bytes), which names the sample by its shard and offset; it is mapped
to the sample's ordinal in the split (the order of the folder's own indexes, as the skipped-sample report counts
them). A step's batches add their ordinals to the epoch's log; a checkpoint keeps the epoch's trained samples as
a bitmap per rank (1.28 M samples: 160 KB).
"""
from __future__ import annotations

import numpy as np
import torch

from ddmim.data.dali_format import Shards, index_entries


class SampleOrdinals:
    """Maps a batch's source_info bytes to the samples' ordinals in the split."""

    def __init__(self, own: Shards):
        self.shard = {tar: n for n, tar in enumerate(own[0])}
        self.offsets, self.ordinals, count = [], [], 0
        for index in own[1]:
            offsets = np.array([offset for _, offset, _ in index_entries(index)], dtype=np.int64)
            order = np.argsort(offsets, kind="stable")
            self.offsets.append(offsets[order])
            self.ordinals.append(count + order)
            count += len(offsets)
        self.size = count

    def of(self, source_info: torch.Tensor) -> np.ndarray:
        """The ordinals of a batch's samples (source_info: uint8, one zero-padded row per sample)."""
        rows = source_info.cpu().numpy()
        out = np.empty(len(rows), dtype=np.int64)
        for i, row in enumerate(rows):
            tar, offset, _ = row.tobytes().rstrip(b"\0").decode().rsplit(":", 2)
            n = self.shard[tar]
            out[i] = self.ordinals[n][np.searchsorted(self.offsets[n], int(offset))]
        return out


class EpochLog:
    """The ordinals each batch of the current epoch trained, in order; `mark()` is a position a state can keep."""

    def __init__(self, size: int):
        self.size = size
        self.batches: list[np.ndarray] = []

    def start(self, trained: np.ndarray | None = None) -> None:
        """A new epoch, or one resumed with `trained` (a bitmap) already done."""
        self.batches = [] if trained is None or not trained.any() else [np.flatnonzero(trained)]

    def add(self, ordinals: np.ndarray) -> None:
        self.batches.append(ordinals)

    def mark(self) -> tuple[list[np.ndarray], int]:
        return self.batches, len(self.batches)

    def packed(self, mark: tuple[list[np.ndarray], int]) -> torch.Tensor:
        """The bitmap of the samples trained up to `mark`, packed (np.packbits) in a uint8 tensor: a checkpoint
        holds tensors, which torch.load reads with weights_only, and no numpy arrays."""
        trained = np.zeros(self.size, dtype=bool)
        batches, count = mark
        if count:
            trained[np.concatenate(batches[:count])] = True
        return torch.from_numpy(np.packbits(trained))


def union_of(packed: list[torch.Tensor], size: int) -> np.ndarray:
    """The samples any rank had trained, from the ranks' packed bitmaps."""
    trained = np.zeros(size, dtype=bool)
    for bits in packed:
        trained |= np.unpackbits(bits.numpy(), count=size).astype(bool)
    return trained
