"""How many loader workers this machine can run: refused past 4 per core, and capped at the core count for the
loaders whose workers are threads."""
from __future__ import annotations

import os

from ddmim.errors import UserError, say


def check_workers(workers: int) -> None:
    """More loader processes than 4 per core cannot help and, in the thousands, exhaust the machine (a typo
    like --workers 100000 forked 1,169 processes before it hung)."""
    limit = 4 * (os.cpu_count() or 1)
    if workers > limit:
        raise UserError(f"data.num_workers {workers} is more than 4 per core of this machine ({limit}); use at most "
                        f"{limit}")


_capped: set[int] = set()


def loader_threads(workers: int) -> int:
    """FFCV's and DALI's workers are threads of one process, which numba and DALI cap at the core count."""
    cores = os.cpu_count() or 1
    if workers > cores and workers not in _capped:
        _capped.add(workers)
        say(f"ddmim: data.num_workers {workers} is more than this machine's {cores} cores; FFCV and DALI run "
            f"{cores} threads")
    return max(1, min(workers, cores))


def worker_context(world: int, workers: int):
    """The start method of the folder loader's workers: forkserver in a rank of a process group, else fork (None).
    Forked from a rank, whose communication threads may hold a lock at that moment, a worker hung in 1 of 5
    two-rank CPU runs (blocked on a futex from its first instruction, with the rank waiting on it for ever). The
    server is a clean process that imports the loader's modules once, so each worker starts from it quickly."""
    import multiprocessing as mp

    import torch.distributed as dist

    if world < 2 or not workers or not (dist.is_available() and dist.is_initialized()):
        return None
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["ddmim.data.folder"])
    return context
