"""The `ddmim` command line. Mistakes a user can make end in one `ddmim: error: ...` line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import yaml

from ddmim.config import KERNEL_CHOICES, make_config, preset_names
from ddmim.data import FORMATS
from ddmim.errors import UserError
from ddmim.trainer import ACCELERATORS, PRECISIONS


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="pretrain a Swin backbone with DDMIM",
        description="Pretrain with DDMIM. Without --data, builds (once) the sample data set of handwritten "
                    "digits and trains the 'tiny' preset on the CPU in a few minutes.")
    p.add_argument("--data", type=Path, help="data set root: train/<class>/* and val/<class>/* (folder), "
                   "train.beton and val.beton (ffcv), or train/*.tar and val/*.tar shards (dali); "
                   "default: the built-in sample data set")
    p.add_argument("--data-format", "--format", dest="format", default="auto", choices=FORMATS,
                   help="storage format of --data (default auto: told from the files). ffcv and dali "
                        "apply the same augmentation as folder (crop scale/ratio, flip, normalisation, size)")
    p.add_argument("--preset", help=f"configuration preset: {', '.join(preset_names())} "
                   "(default: tiny without --data, seed with it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set optim.lr=1e-3 --set model.depths=[2,2,2,2]; "
                        "`ddmim config` lists them")
    p.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    p.add_argument("--batch-size", type=int, help="shortcut for --set train.batch_size=N")
    p.add_argument("--lr", type=float, help="shortcut for --set optim.lr=X")
    p.add_argument("--workers", type=int, help="loader worker processes; shortcut for --set data.num_workers=N")
    p.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimiser steps (default: all epochs)")
    p.add_argument("--out", type=Path, help="run folder for config, logs, checkpoints and summary "
                   "(default runs/<preset>-<time>); must not exist or be empty")
    p.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="auto: CUDA when available")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16-mixed on CUDA, 32 on the CPU")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for input batches and the convolutions")
    p.add_argument("--kernels", choices=KERNEL_CHOICES,
                   help="fused Triton kernels for the masks and losses (auto: on CUDA) or the PyTorch "
                        "references; shortcut for --set train.kernels=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and CI)")


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print a preset's full configuration, with overrides applied")
    p.add_argument("--preset", default="seed", help=f"one of: {', '.join(preset_names())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _train_overrides(args) -> list[str]:
    shortcuts = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
                 "workers": "data.num_workers", "seed": "train.seed", "kernels": "train.kernels"}
    extra = [f"{key}={getattr(args, name)}" for name, key in shortcuts.items() if getattr(args, name) is not None]
    return args.overrides + extra


def cmd_train(args) -> int:
    from data_prep.sample_data import build_sample_dataset, default_sample_root
    from ddmim.pretrain import format_summary, pretrain

    preset = args.preset or ("tiny" if args.data is None else "seed")
    cfg = make_config(preset, _train_overrides(args))
    data = args.data
    if data is None:
        data = build_sample_dataset(default_sample_root())
        print(f"using the built-in sample data set at {data}")
    out = args.out or Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    summary = pretrain(cfg, data, out, data_format=args.format, accelerator=args.accelerator,
                       precision=args.precision, channels_last=args.channels_last, max_steps=args.max_steps,
                       progress_bar=not args.no_progress)
    print(format_summary(summary))
    return 0


def cmd_config(args) -> int:
    print(yaml.safe_dump(make_config(args.preset, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddmim", description="DDMIM pretraining for Swin backbones")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_config(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "config": cmd_config}
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"ddmim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddmim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
