"""What Lightning and ddmim's module add to a step: the same pretraining step in a plain PyTorch loop and through
`DDMIMModule` in the Trainer that `ddmim train` builds (its loggers, checkpoints and measuring callbacks).

    python benchmarks/bench_lightning.py [--preset seed] [--variant eager] [--batch 128] [--json PATH]

Both run on one synthetic batch already on the device. The plain loop is benchmarks/train_steps.py's step
(masks, forward, backward, AdamW, EMA on the preset's schedule); the Lightning run adds what the module does
besides (the non-finite check, logging, the LR scheduler, callbacks). Timed: --steps steps after --warmup,
the device waited for at both ends, in rounds alternating the two (medians). Overhead = Lightning's step time
over the plain loop's, minus one. Writes benchmarks/results/lightning-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import device_sync, median_step_seconds, write_results
from benchmarks.train_steps import VARIANTS, parse_spec, pretrain_step
from ddmim.config import config_from_dict, preset_values, with_overrides
from ddmim.train.launch import Launch, resolve_launch
from ddmim.train.pretrain_module import DDMIMModule
from ddmim.train.speed_test import OnDevice
from ddmim.train.trainer import build_trainer


class StepClock(pl.Callback):
    """Seconds per step from the start of batch `warmup` to the end of the last one, the device waited for."""

    def __init__(self, warmup: int, steps: int, sync):
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.seconds = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.sync()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            self.sync()
            self.seconds = (time.perf_counter() - self._start) / self.steps


def lightning_step_seconds(spec: str, variant: str, batch: int, args, sync) -> float:
    v = VARIANTS[variant]
    preset, overrides = parse_spec(spec)
    values = with_overrides(preset_values(preset, overrides + v.get("set", [])), typed={
        "train.batch_size": batch, "train.kernels": v["kernels"], "train.compile": v["compile"],
        "train.compile_backend": args.compile_backend})
    cfg = config_from_dict(values)
    launch = resolve_launch(Launch(precision=args.precision, channels_last=v["channels_last"],
                                   max_steps=args.warmup + args.steps, progress_bar=False))
    module = DDMIMModule(cfg, channels_last=v["channels_last"], cuda=launch.accelerator == "gpu")
    clock = StepClock(args.warmup, args.steps, sync)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_trainer(Path(tmp), cfg, launch)
        run.trainer.callbacks.append(clock)
        device = run.trainer.strategy.root_device
        size = cfg.model.img_size
        synthetic = (torch.randn(batch, 3, size, size, device=device), torch.zeros(batch, dtype=torch.long,
                                                                                   device=device))
        run.trainer.fit(module, train_dataloaders=OnDevice(synthetic, args.warmup + args.steps))
    return clock.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="eager")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["auto", "32", "bf16-mixed"], default="auto")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision if args.precision != "auto" else ("bf16-mixed" if device.type == "cuda" else "32")
    sync = device_sync(device)
    plain_step = pretrain_step(args.preset, args.variant, args.batch, device, args.precision, args.compile_backend)
    plain, lightning = [], []
    for _ in range(args.rounds):
        plain.append(median_step_seconds(plain_step.run, warmup=args.warmup, repeats=1, steps_per_repeat=args.steps,
                                         sync=sync)[0])
        lightning.append(lightning_step_seconds(args.preset, args.variant, args.batch, args, sync))
    plain_s, lightning_s = statistics.median(plain), statistics.median(lightning)
    overhead = lightning_s / plain_s - 1
    print(f"{args.preset} {args.variant} batch {args.batch} {args.precision}: plain loop {1000 * plain_s:.2f} ms, "
          f"Lightning {1000 * lightning_s:.2f} ms per step: overhead {100 * overhead:+.1f}% "
          f"({1000 * (lightning_s - plain_s):+.2f} ms)")
    payload = {"device": str(device), "preset": args.preset, "variant": args.variant, "batch": args.batch,
               "precision": args.precision, "steps": args.steps, "rounds": args.rounds,
               "plain_step_ms": 1000 * plain_s, "lightning_step_ms": 1000 * lightning_s,
               "plain_step_ms_all": [1000 * t for t in plain], "lightning_step_ms_all": [1000 * t for t in lightning],
               "overhead_ms": 1000 * (lightning_s - plain_s), "overhead_share": overhead, **plain_step.report()}
    print(f"wrote {write_results('lightning', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
