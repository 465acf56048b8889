"""What the benchmark scripts share: median timing; machine description and results files come from ddmim."""
from __future__ import annotations

import statistics
import time
from typing import Callable

from ddmim.machine import write_results  # noqa: F401 - re-exported for the scripts


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
