"""A description of the machine a figure was measured on, its peak FLOP/s, and writing results files."""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def user_results_folder() -> Path:
    """Where `ddmim` itself writes benchmark results: the user's cache, never the installed package."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ddmim" / "benchmarks"


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("timm", "pytorch_lightning", "triton"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def peak_flops(precision: str = "bf16-mixed") -> float | None:
    """The device's dense peak FLOP/s at the precision's compute type (Lightning's table); None off CUDA or for
    a GPU Lightning does not know."""
    from lightning_fabric.utilities.throughput import get_available_flops

    if not torch.cuda.is_available():
        return None
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision, torch.float32)
    return get_available_flops(torch.device("cuda"), dtype)


def write_results(name: str, payload: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    payload = {"benchmark": name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path
