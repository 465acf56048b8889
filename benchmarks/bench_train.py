"""Images/s of one full pretraining step (DDMIM: student and teacher forward; MAE: encoder on the visible
patches and decoder), backward, AdamW step, EMA update.

    python benchmarks/bench_train.py [--presets seed tiny] [--repeats 5] [--channels-last]
    python benchmarks/bench_train.py --presets seed seed:model.drop_path_rate=0,ema.teacher_mode=eval

A preset may carry overrides after a colon (comma-separated KEY=VALUE), so that variants of one preset
are timed in the same run.

Synthetic batches already on the device, so this is the model's ceiling without data loading. The EMA
update runs every step here (the seed runs it every 32), so the figure is slightly pessimistic.
Medians over repeats after warm-up; writes benchmarks/results/train-<device>.json.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ddmim.config import make_config
from ddmim.models.backbones import pretraining_model
from ddmim_benchmarks.common import median_seconds, write_results

DEFAULT_BATCH = {"seed": 8}


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """'seed:a.b=1,c.d=2' -> ('seed', ['a.b=1', 'c.d=2'])."""
    preset, _, overrides = spec.partition(":")
    return preset, [o for o in overrides.split(",") if o]


def bench_preset(spec: str, batch: int, device: torch.device, precision: str, channels_last: bool,
                 warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    preset, overrides = parse_spec(spec)
    cfg = make_config(preset, overrides)
    model = pretraining_model(cfg).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    size = cfg.model.img_size
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        with autocast:
            base, masks = model.draw_masks(batch, device=device)
            loss = model(images, base, masks)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(cfg.ema.decay)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    median, times = median_seconds(step, warmup=warmup, repeats=repeats, sync=sync)
    return {"preset": spec, "img_size": size, "batch": batch, "precision": precision,
            "channels_last": channels_last, "step_s_median": median, "step_s_all": times,
            "images_per_s": batch / median,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["seed", "tiny"])
    parser.add_argument("--batch", type=int, help="batch size for every preset (default: 8 for seed, the "
                        "preset's own otherwise)")
    parser.add_argument("--precision", choices=["auto", "32", "bf16-mixed"], default="auto",
                        help="auto: bf16-mixed on CUDA, 32 on the CPU")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if device.type == "cuda" else "32")
    rows = []
    for preset in args.presets:
        name, overrides = parse_spec(preset)
        batch = args.batch or DEFAULT_BATCH.get(name) or make_config(name, overrides).train.batch_size
        rows.append(bench_preset(preset, batch, device, precision, args.channels_last, args.warmup, args.repeats))

    width = max(8, *(len(r["preset"]) + 2 for r in rows))
    print(f"{'preset':<{width}}{'img':>5}{'batch':>7}{'precision':>12}{'step ms':>11}{'images/s':>11}{'x first':>9}")
    for r in rows:
        print(f"{r['preset']:<{width}}{r['img_size']:>5}{r['batch']:>7}{r['precision']:>12}"
              f"{1000 * r['step_s_median']:>11.1f}{r['images_per_s']:>11.1f}"
              f"{r['images_per_s'] / rows[0]['images_per_s']:>9.2f}")
    path = write_results("train", {"device": str(device), "warmup": args.warmup, "repeats": args.repeats,
                                   "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
