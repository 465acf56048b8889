"""Exact resumption of a folder run killed mid-epoch: the resumed run reads and augments what the run that
was never stopped would have.

Two things make a torch DataLoader's epoch depend on more than the run's seed: the random streams of its
workers (which samples each worker drew before, and the base seed the loader takes from the main process's
generator at every `iter()`), and where in the epoch it starts. `ResumableSampler` deals out this rank's
share of a seeded shuffle per epoch (DistributedSampler's), paired with a seed for each visit, and starts a
resumed epoch at the batch the run stopped at, without reading the ones before. `seeded_visit` runs one
sample's decode and augmentation under that seed (torch, numpy and Python streams), restoring the caller's
streams afterwards, so a worker, or the main process with no workers, gives the same pixels either way.
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DistributedSampler, get_worker_info


def resume_position(trained_steps: int, batches: int, accumulate: int = 1) -> tuple[int, int]:
    """(epoch, micro-batches of it already trained) on a rank after `trained_steps` optimiser steps, with `batches`
    micro-batches per epoch and `accumulate` per step (an epoch's last step may have fewer: Lightning steps on an
    epoch's last batch)."""
    epoch, steps = divmod(trained_steps, -(-batches // accumulate))
    return epoch, steps * accumulate


def dealt_in_steps(size: int, *, seed: int, epoch: int, world: int, rank: int, accumulate: int,
                   batch_size: int) -> np.ndarray:
    """The samples (of 0..size-1) that process `rank` of `world` trains in `epoch`, micro-batch by micro-batch.
    The epoch's shuffle (DistributedSampler's, seeded by seed + epoch) is cut into steps of the global batch
    G = batch_size x world x accumulate (the last partial step dropped); step k trains shuffle[kG:(k+1)G], dealt to
    the world x accumulate slots as DistributedSampler deals (slot s gets positions s, s + slots, ...), and a
    process trains its slots' micro-batches in turn. A step's images thus depend on the global batch alone: the
    same on 1 process accumulating 2 micro-batches of 32, on 2 processes of 32 and on 1 process of 64, so a run
    resumes on another process count or per-device batch. Without accumulation this is DistributedSampler's
    order, cut to whole steps."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    shuffle = torch.randperm(size, generator=generator).numpy()
    slots = world * accumulate
    steps = size // (slots * batch_size)
    grid = shuffle[:steps * slots * batch_size].reshape(steps, batch_size, slots)  # [step, image, slot]
    mine = grid[:, :, rank * accumulate:(rank + 1) * accumulate]
    return np.ascontiguousarray(mine.transpose(0, 2, 1)).reshape(-1)  # [step, micro-batch, image]


def visit_seeds(seed: int, epoch: int, size: int) -> np.ndarray:
    """The seed of each sample's visit in `epoch`: one vectorised draw per epoch (a per-sample SeedSequence took
    seconds per epoch at ImageNet's size, on the main process)."""
    return np.random.default_rng([seed, epoch]).integers(0, 2**32, size=size, dtype=np.uint32)  # numpy seeds are 32-bit


def _seed_streams(seed: int) -> None:
    # the CPU generator alone: torch.manual_seed also seeds every CUDA device (68 us a call here) and the
    # transforms draw on the CPU
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def seeded_visit(seed: int):
    if get_worker_info() is not None:  # a loader worker's streams serve only visits, each seeded here
        _seed_streams(seed)
        yield
        return
    # the main process's streams belong to the training loop: put them back (saving numpy's costs 60 us, which
    # is why workers skip it: 10-20% of a sample's decode and crop)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    _seed_streams(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class ResumableSampler(DistributedSampler):
    """Yields (sample index, visit seed), in the order of `dealt_in_steps`.

    Given `trained_steps` (the optimiser steps the run has taken), every epoch it deals out is the one those steps
    imply, from the micro-batch after the last one trained: Lightning's own epoch number, which it sets on the
    sampler, is one too high after a restart from an end-of-epoch checkpoint, and the resumed run then trained on
    the next epoch's order in place of this one's. Without it (outside a trainer), the epoch is
    DistributedSampler's, set with `set_epoch`."""

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int, accumulate: int = 1,
                 trained_steps: Callable[[], int] | None = None):
        # a DistributedSampler (Lightning then leaves it in place) for its epoch and seed; the dealing is ours
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.world, self.process_rank = num_replicas, rank
        self.batch_size, self.accumulate = batch_size, accumulate
        self.trained_steps = trained_steps

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size

    def batches_per_epoch(self) -> int:
        """Micro-batches of an epoch on this rank (the last partial step dropped)."""
        return len(self.dataset) // (self.batch_size * self.world * self.accumulate) * self.accumulate

    def __iter__(self):
        done = 0
        if self.trained_steps is not None:
            self.epoch, done = resume_position(self.trained_steps(), self.batches_per_epoch(), self.accumulate)
        indices = dealt_in_steps(len(self.dataset), seed=self.seed, epoch=self.epoch, world=self.world,
                                 rank=self.process_rank, accumulate=self.accumulate, batch_size=self.batch_size)
        seeds = visit_seeds(self.seed, self.epoch, len(self.dataset))
        return ((int(i), int(seeds[i])) for i in indices[done * self.batch_size:])
