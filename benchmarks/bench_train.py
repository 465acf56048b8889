"""The model's ceiling: images/s of full training steps on synthetic batches already on the device (no loading).

    python benchmarks/bench_train.py [--presets seed tiny] [--variants eager compile] [--batches 128 256]
    python benchmarks/bench_train.py --presets seed seed:model.drop_path_rate=0,ema.teacher_mode=eval
    python benchmarks/bench_train.py --finetune --presets seed --variants eager
    python benchmarks/bench_train.py --json OUT/seed-eager.json

Every (preset, variant, batch) row gives the median step time over --repeats blocks of --steps steps (the device
is waited for at the ends of a block only), images/s, achieved TFLOP/s and, on a GPU with a known peak, model
FLOP utilisation (Lightning's FLOP counter: forward and backward of everything the step runs), peak memory,
and what torch.compile did. Variants and what a step does: benchmarks/train_steps.py. A row whose step fails
or whose loss is not finite is reported with its error, and the script exits 1.
Writes benchmarks/results/train-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import device_sync, median_step_seconds, reset_peak_memory, write_results
from benchmarks.train_steps import VARIANTS, finetune_step, parse_spec, pretrain_step
from ddmim.config import make_config
from ddmim.finetune_config import make_finetune_config
from ddmim.machine import peak_flops, peak_memory_gib

CPU_BATCH = {"seed": 8}  # a 224 px preset at its own batch takes minutes per step on a CPU


def default_batch(spec: str, finetune: bool, device: torch.device) -> int:
    name, overrides = parse_spec(spec)
    if device.type == "cpu" and name in CPU_BATCH:
        return CPU_BATCH[name]
    cfg = (make_finetune_config if finetune else make_config)(name, overrides)
    return cfg.train.batch_size


def bench_row(spec: str, variant: str, batch: int, device: torch.device, args) -> dict:
    build = finetune_step if args.finetune else pretrain_step
    torch._dynamo.reset()  # each row compiles on its own: its graph and break counts are its own
    from torch._dynamo.utils import counters
    counters.clear()
    reset_peak_memory(device)
    step = build(spec, variant, batch, device, args.precision, compile_backend=args.compile_backend)
    median, per_step = median_step_seconds(step.run, warmup=args.warmup, repeats=args.repeats,
                                           steps_per_repeat=args.steps, sync=device_sync(device))
    images_per_s = batch / median
    peak = peak_flops(args.precision) if device.type == "cuda" else None
    row = {"preset": spec, "variant": variant, **VARIANTS[variant], "batch": batch, "img_size": step.img_size,
           "precision": args.precision, "step_ms_median": 1000 * median, "step_ms_all": [1000 * t for t in per_step],
           "images_per_s": images_per_s, "flops_per_image": step.flops_per_image,
           "tflops": step.flops_per_image * images_per_s / 1e12,
           "mfu": step.flops_per_image * images_per_s / peak if peak else None,
           "peak_memory_gib": peak_memory_gib(device), "final_loss": step.loss(),
           "trainable_params": sum(p.numel() for p in step.model.parameters() if p.requires_grad), **step.report()}
    if not math.isfinite(row["final_loss"]):
        row["error"] = f"non-finite loss {row['final_loss']}"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["seed", "tiny"])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        help="default: eager on CUDA, torch_kernels on a CPU (the Triton kernels need CUDA there)")
    parser.add_argument("--batches", nargs="+", type=int,
                        help="batch sizes (default: the preset's own; 8 for seed on a CPU)")
    parser.add_argument("--finetune", action="store_true", help="the presets are fine-tuning presets")
    parser.add_argument("--precision", choices=["auto", "32", "bf16-mixed"], default="auto",
                        help="auto: bf16-mixed on CUDA, 32 on the CPU")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile variants (aot_eager: tracing only, for rehearsals)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--json", help="results file (default benchmarks/results/train-<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "auto":
        args.precision = "bf16-mixed" if device.type == "cuda" else "32"
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as training sets it (ddmim/train/launch.py)
    rows = []
    payload = {"device": str(device), "kind": "finetune" if args.finetune else "pretrain", "warmup": args.warmup,
               "repeats": args.repeats, "steps_per_repeat": args.steps, "rows": rows}
    for spec in args.presets:
        for variant in args.variants or (["eager"] if device.type == "cuda" else ["torch_kernels"]):
            for batch in args.batches or [default_batch(spec, args.finetune, device)]:
                try:
                    rows.append(bench_row(spec, variant, batch, device, args))
                except Exception as exc:  # one failed row (out of memory, a compile error) must not hide the rest
                    rows.append({"preset": spec, "variant": variant, "batch": batch,
                                 "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"})
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                path = write_results("train", payload, args.json)  # row by row: a run cut short keeps its rows
    print(f"{'preset':<14}{'variant':<15}{'batch':>6}{'step ms':>10}{'images/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'GiB':>7}  compile")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<14}{r['variant']:<15}{r['batch']:>6}  FAILED: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['preset']:<14}{r['variant']:<15}{r['batch']:>6}{r['step_ms_median']:>10.1f}"
              f"{r['images_per_s']:>10.1f}{r['tflops']:>9.2f}{mfu:>7}{r['peak_memory_gib']:>7.2f}  {r['compile']}")
    print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
