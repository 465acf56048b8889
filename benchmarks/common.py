"""What the benchmark scripts share: median timing, device memory, and results files (in benchmarks/results/ of
the checkout they are run from, or at an explicit --json path; the machine's description comes from ddmim)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ddmim.machine import write_results as _write

RESULTS = Path("benchmarks") / "results"  # relative to the current folder: run the scripts from the checkout


def write_results(name: str, payload: dict, path: Path | None = None) -> Path:
    """benchmarks/results/<name>-<device>.json, or `path` when given (the GPU suite gives one per step)."""
    return _write(name, payload, RESULTS, path)


def device_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_seconds(fn: Callable[[], None], *, warmup: int, repeats: int,
                   sync: Callable[[], None]) -> tuple[float, list[float]]:
    """Median wall time of `fn` over `repeats` calls after `warmup` calls; `sync` waits for queued device work."""
    return median_step_seconds(fn, warmup=warmup, repeats=repeats, steps_per_repeat=1, sync=sync)


def median_step_seconds(step: Callable[[], None], *, warmup: int, repeats: int, steps_per_repeat: int,
                        sync: Callable[[], None]) -> tuple[float, list[float]]:
    """Median seconds per step over `repeats` blocks of `steps_per_repeat` steps, after `warmup` steps. The device
    is waited for only at the ends of a block, so the host can run ahead within it as in training."""
    for _ in range(warmup):
        step()
    sync()
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps_per_repeat):
            step()
        sync()
        per_step.append((time.perf_counter() - start) / steps_per_repeat)
    return statistics.median(per_step), per_step


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
