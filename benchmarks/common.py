"""What every benchmark here shares: machine description, median timing, and the JSON results file."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for name in ("timm", "pytorch_lightning", "triton"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def median_seconds(fn: Callable[[], None], *, warmup: int, repeats: int, sync: Callable[[], None]) -> tuple[float, list[float]]:
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


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"{name}-{device}.json"
    payload = {"benchmark": name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path
