"""What the benchmark scripts share: median timing, and results files in benchmarks/results/ of the checkout
they are run from (the machine's description comes from ddmim)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

from ddmim.machine import write_results as _write

RESULTS = Path("benchmarks") / "results"  # relative to the current folder: run the scripts from the checkout


def write_results(name: str, payload: dict) -> Path:
    return _write(name, payload, RESULTS)


def median_seconds(fn: Callable[[], None], *, warmup: int, repeats: int,
                   sync: Callable[[], None]) -> tuple[float, list[float]]:
    """Median wall time of `fn` over `repeats` calls after `warmup` calls; `sync` waits for queued device work."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
