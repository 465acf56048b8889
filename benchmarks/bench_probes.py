"""`ddmim eval`'s k-NN and linear probe at ImageNet's size, on synthetic features: time and peak memory.

    python benchmarks/bench_probes.py [--train 1281167] [--val 50000] [--dim 768] [--classes 1000]
                                      [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16] [--repeats 3]

The features are a random centre per class plus noise, stored as `ddmim eval` stores them (`--dtype auto`: the
device's `feature_dtype`). k-NN: the median seconds of one test block (1,024 val rows) against every train row,
times the blocks of the val split. Linear probe: the median seconds of one epoch on `--probe-steps` batches (its
standardisation and evaluation included), scaled to the batches of the whole train split. Peak memory: the
process's peak resident size (CPU) or the device's peak allocation (CUDA) over the whole run, beside the stored
features' own size.
Writes benchmarks/results/probes-<dtype>-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import device_sync, median_seconds, write_results
from ddmim.probes import feature_dtype, knn_predict, linear_probe, nearest

TEST_BLOCK = 1024


def synthetic(rows: int, centres: torch.Tensor, dtype: torch.dtype, generator: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels), filled in blocks so that no float32 copy of the whole matrix exists."""
    labels = torch.randint(len(centres), (rows,), generator=generator)
    feats = torch.empty(rows, centres.shape[1], dtype=dtype, device=device)
    for r0 in range(0, rows, 65536):
        y = labels[r0:r0 + 65536]
        feats[r0:r0 + len(y)] = (centres[y] + torch.randn(len(y), centres.shape[1], generator=generator)).to(
            device, dtype)
    return feats, labels


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1_281_167)
    parser.add_argument("--val", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe-steps", type=int, default=10)
    parser.add_argument("--probe-batch", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = feature_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    sync = device_sync(device)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g) * 0.5
    train_f, train_y = synthetic(args.train, centres, dtype, g, device)
    val_f, val_y = synthetic(min(args.val, TEST_BLOCK), centres, dtype, g, device)
    stored_mib = train_f.numel() * train_f.element_size() / 2**20

    knn_block_s, knn_runs = median_seconds(lambda: nearest(train_f, val_f, 20), warmup=1, repeats=args.repeats,
                                           sync=sync)
    predicted = knn_predict(train_f, train_y, val_f, args.classes).cpu()
    knn_top1 = 100.0 * (predicted == val_y).float().mean().item()

    steps_per_epoch = math.ceil(args.train / args.probe_batch)
    sample = min(args.train, args.probe_steps * args.probe_batch)
    probe_s, probe_runs = median_seconds(
        lambda: linear_probe(train_f[:sample], train_y[:sample], val_f, val_y, args.classes, epochs=1,
                             batch=args.probe_batch), warmup=1, repeats=args.repeats, sync=sync)
    blocks = math.ceil(args.val / TEST_BLOCK)
    row = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "train": args.train, "val": args.val,
           "dim": args.dim, "classes": args.classes, "stored_train_mib": round(stored_mib),
           "knn_block_s_median": knn_block_s, "knn_block_runs": knn_runs, "knn_val_blocks": blocks,
           "knn_val_s_estimate": knn_block_s * blocks, "knn_top1_first_block": knn_top1,
           "probe_steps_timed": math.ceil(sample / args.probe_batch), "probe_s_median": probe_s,
           "probe_runs": probe_runs, "probe_epoch_s_estimate": probe_s * steps_per_epoch / math.ceil(
               sample / args.probe_batch), "peak_mib": round(peak_mib(device))}
    print(f"{device} {row['dtype']}: train {args.train:,} x {args.dim} stored in {stored_mib:.0f} MiB; k-NN "
          f"{knn_block_s:.2f} s per {TEST_BLOCK} val rows (median of {args.repeats}), so "
          f"{row['knn_val_s_estimate']:.0f} s for {args.val:,}; linear probe {row['probe_epoch_s_estimate']:.0f} s "
          f"per epoch of batch {args.probe_batch}; peak memory {row['peak_mib']:,} MiB")
    name = f"probes-{row['dtype']}"
    print(f"wrote {write_results(name, row, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
