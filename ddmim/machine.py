"""A description of the machine a figure was measured on, its peak FLOP/s, and writing results files."""
from __future__ import annotations

import json
import os
import platform
import resource
from datetime import datetime, timezone
from pathlib import Path

import torch

from ddmim.atomic import write_text
from ddmim.user_cache import user_cache


def user_results_folder() -> Path:
    """Where `ddmim` itself writes benchmark results: the user's cache, never the installed package."""
    return user_cache("benchmarks")


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
    return get_available_flops(torch.device("cuda"), dtype) or _published_peak(torch.cuda.get_device_name(), dtype)


# Dense (no sparsity) tensor-core peaks of GPUs Lightning's table lacks. H200 SXM: NVIDIA's H200 datasheet gives
# the same compute as the H100 SXM (BF16/FP16 1,979 and TF32 989 TFLOP/s "with sparsity", i.e. 989.5 and
# 494.7 dense; FP32 67). fp32 runs use TF32 matmuls here (launch.py sets "high" matmul precision).
PUBLISHED_PEAKS = {"h200": {torch.bfloat16: 989.5e12, torch.float16: 989.5e12, torch.float32: 494.7e12}}


def _published_peak(device_name: str, dtype: torch.dtype) -> float | None:
    name = device_name.lower()
    return next((peaks[dtype] for key, peaks in PUBLISHED_PEAKS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory allocated on CUDA (since the last reset); the process's peak resident size on the CPU
    (which cannot be reset, so it only grows within a process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def write_results(name: str, payload: dict, folder: Path, path: Path | None = None) -> Path:
    """FOLDER/<name>-<device>.json, or `path` when given, with the machine's description."""
    path = Path(path) if path else folder / f"{name}-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(), **payload}
    write_text(path, json.dumps(payload, indent=2))
    return path
