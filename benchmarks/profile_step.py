"""Where a training step's time goes: the top kernels by device time, and the share of the step outside the model.

    python benchmarks/profile_step.py [--preset seed] [--variant eager] [--batch 128] [--json PATH]

1. Phases: --steps steps with the device waited for between the step's parts (masks, forward + backward,
   optimiser, EMA update), so each part's time is its own; "outside the model" is everything but forward +
   backward. The waits remove overlap between parts, so the shares slightly overstate the small parts.
2. torch.profiler over --profile-steps steps: the --top kernels by total device time on CUDA (on a CPU, the
   top operators by self CPU time, as a rehearsal).
Writes benchmarks/results/profile-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import device_sync, write_results
from benchmarks.train_steps import VARIANTS, pretrain_step


def phase_times(step, steps: int, sync) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for _ in range(steps):
        for name, fn in step.phases:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            totals[name] += time.perf_counter() - start
    return {name: 1000 * total / steps for name, total in totals.items()}


def top_entries(prof, cuda: bool, steps: int, top: int) -> list[dict]:
    totals: dict[str, float] = defaultdict(float)
    if cuda:
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us()
    else:
        for entry in prof.key_averages():
            if not entry.key.startswith("ddmim:"):
                totals[entry.key] += entry.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"name": name[:160], "ms_per_step": us / 1000 / steps, "share": us / whole} for name, us in ranked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="eager")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["auto", "32", "bf16-mixed"], default="auto")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps timed phase by phase")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if cuda else "32")
    if cuda:
        torch.set_float32_matmul_precision("high")
    sync = device_sync(device)
    step = pretrain_step(args.preset, args.variant, args.batch, device, precision, args.compile_backend)
    for _ in range(args.warmup):
        step.run()
    phases = phase_times(step, args.steps, sync)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step.run()
        sync()
    top = top_entries(prof, cuda, args.profile_steps, args.top)
    total = sum(phases.values())
    outside = (total - phases["forward_backward"]) / total
    print(f"{args.preset} {args.variant} batch {args.batch} {precision}: step {total:.1f} ms with waits between parts")
    for name, ms in phases.items():
        print(f"  {name:<18}{ms:>9.2f} ms {100 * ms / total:>6.1f}%")
    print(f"  outside the model {100 * outside:.1f}% of the step")
    print(f"top {len(top)} {'kernels by device time' if cuda else 'CPU operators by self time'}:")
    for entry in top:
        print(f"  {entry['ms_per_step']:>9.3f} ms {100 * entry['share']:>5.1f}%  {entry['name'][:100]}")
    payload = {"device": str(device), "preset": args.preset, "variant": args.variant, "batch": args.batch,
               "precision": precision, "phases_ms": phases, "outside_model_share": outside,
               "top_kind": "cuda kernels" if cuda else "cpu operators", "top": top, **step.report()}
    print(f"wrote {write_results('profile', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
