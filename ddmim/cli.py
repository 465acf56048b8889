"""The `ddmim` command line. Mistakes a user can make end in one `ddmim: error: ...` line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import yaml

from ddmim.cli_failures import said
from ddmim.config import KERNEL_CHOICES, make_config, preset_names
from ddmim.data import FORMATS
from ddmim.errors import UserError
from ddmim.train.launch import ACCELERATORS, PRECISIONS, STRATEGIES, Launch

SHORTCUTS = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
             "workers": "data.num_workers", "seed": "train.seed", "data_layout": "data.layout",
             "val_data": "data.val_path"}


def _add_data(p, required: bool = False) -> None:
    p.add_argument("--data", type=Path, required=required,
                   help="data set root: train/<class>/* and val/<class>/* or any tree of unlabeled images "
                        "(folder), train.beton and val.beton (ffcv), or train/*.tar and val/*.tar shards (dali)"
                        + ("" if required else "; default: the built-in sample data set"))
    p.add_argument("--val-data", help="validation images from a source of their own, all of --data then training: "
                   "a folder of images (class folders, ImageNet's flat val with its ground truth, or any tree), a "
                   "file list, or for converted data a .beton file or shard folder (or a converted folder's val)")
    p.add_argument("--data-format", "--format", dest="format", default="auto", choices=FORMATS,
                   help="storage format of --data (default auto: told from the files); all apply the same "
                        "augmentation (crop scale/ratio, flip, normalisation, size)")


def _add_run(p, kind: str) -> None:
    """Options shared by the commands that train: overrides, shortcuts, device, output."""
    p.add_argument("--preset", help=f"{kind} preset: {', '.join(preset_names(kind))}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set optim.lr=1e-3 --set model.depths=[2,2,2,2]")
    p.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    p.add_argument("--batch-size", type=int, help="shortcut for --set train.batch_size=N")
    p.add_argument("--lr", type=float, help="shortcut for --set optim.lr=X")
    p.add_argument("--workers", type=int, help="loader worker processes; shortcut for --set data.num_workers=N")
    p.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    p.add_argument("--data-layout", choices=["auto", "imagefolder", "unlabeled", "list", "wds"],
                   help="imagefolder (train/<class>/*, val/<class>/* or ImageNet's flat val), unlabeled (any tree "
                        "of images), list (a file of path[,label] lines) or wds (WebDataset .tar shards, any "
                        "writer's); without val/, data.val_fraction is held out; default auto. Shortcut for --set "
                        "data.layout=...")
    p.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimiser steps (default: all epochs)")
    p.add_argument("--out", type=Path, help="run folder for config, logs, checkpoints and summary "
                   "(default runs/<preset>-<time>); must not exist or be empty")
    p.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="auto: CUDA when available")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16-mixed on CUDA (16-mixed on GPUs without bf16), 32 on the CPU")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for input batches and the convolutions")
    p.add_argument("--devices", type=int, default=1, help="GPUs per node (or CPU processes, gloo) (default 1)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="ddp: data-parallel, Lightning launching one process per device (or under torchrun / "
                        "SLURM, which start them)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (falls back to eager with a message if it fails)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and CI)")
    p.add_argument("--resume", choices=["auto"],
                   help="auto: continue the run in --out from its newest checkpoint that loads (weights, optimiser, "
                        "scheduler, step counters, RNG states) and continue its logs; a run of another model is "
                        "refused")


def _launch(args) -> Launch:
    return Launch(accelerator=args.accelerator, precision=args.precision, devices=args.devices,
                  num_nodes=args.num_nodes, strategy=args.strategy, channels_last=args.channels_last,
                  max_steps=args.max_steps, progress_bar=not args.no_progress)


def _typed(args) -> dict:
    """The typed shortcut options as dotted config keys (taken as they are, not read as YAML again)."""
    values = {key: getattr(args, name) for name, key in SHORTCUTS.items() if getattr(args, name, None) is not None}
    if getattr(args, "kernels", None):
        values["train.kernels"] = args.kernels
    if getattr(args, "compile", False):
        values["train.compile"] = True
    return values


def _out(args, name: str) -> Path:
    return args.out or Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddmim", description="DDMIM pretraining and evaluation for Swin backbones")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain a Swin backbone with DDMIM (or SimMIM: --preset simmim)",
                       description="Pretrain. Without --data, builds (once) the sample data set of handwritten "
                                   "digits and trains the 'tiny' preset on the CPU in a few minutes.")
    _add_data(p)
    _add_run(p, "pretrain")
    p.add_argument("--kernels", choices=KERNEL_CHOICES,
                   help="fused Triton kernels for the masks and losses (auto: on CUDA) or the PyTorch references")
    p.add_argument("--benchmark", type=int, metavar="STEPS",
                   help="instead of training: time STEPS steps on a synthetic batch already on the device (the "
                        "model's ceiling) and STEPS with the real loader, and the loader alone; prints images/s, "
                        "loader stall share and (on a known GPU) model FLOP utilisation; JSON in --out, or else in "
                        "~/.cache/ddmim/benchmarks")

    p = sub.add_parser("finetune",
                       help="fine-tune a pretrained backbone (or train from scratch) and report top-1/top-5",
                       description="Fine-tune on labelled data. Without --ckpt the backbone starts from random "
                                   "weights (the supervised baseline). Presets: seed (the seed's BN+MLP head, StepLR), "
                                   "mim (linear head, layer decay, warmup+cosine, mixup/cutmix, label smoothing, "
                                   "RandAugment). RandAugment runs in the PIL pipeline for folder data; FFCV and DALI "
                                   "cannot run it in their pipelines, so it is applied to each batch tensor instead "
                                   "(on the GPU when there is one).")
    _add_data(p, required=True)
    p.add_argument("--ckpt", type=Path, help="pretraining checkpoint (from ddmim train); default: random init")
    p.add_argument("--num-classes", type=int, help="expected number of classes; refused if the data disagrees")
    _add_run(p, "finetune")

    p = sub.add_parser("eval", help="frozen-feature evaluation: k-NN or linear probe on pooled backbone features")
    p.add_argument("method", choices=["knn", "linear"])
    _add_data(p, required=True)
    p.add_argument("--ckpt", type=Path, help="pretraining checkpoint; default: a random-init backbone")
    p.add_argument("--preset", default="tiny", help="pretrain preset giving the backbone shape and transform when "
                   "there is no --ckpt (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the checkpoint's configuration (or the preset's), e.g. "
                        "data.num_workers=4")
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (default 0.07)")
    p.add_argument("--epochs", type=int, default=100, help="linear probe epochs (full batch; default 100)")

    p = sub.add_parser("visualize", help="PNG grid: original, masked input, reconstruction, reconstruction pasted in")
    p.add_argument("--ckpt", type=Path, required=True, help="pretraining checkpoint")
    _add_data(p, required=True)
    p.add_argument("--out", type=Path, default=Path("reconstructions.png"), help="PNG file to write")
    p.add_argument("--num", type=int, default=8, help="validation images to show (default 8)")

    p = sub.add_parser("export", help="student backbone as safetensors that timm.create_model loads (strict)")
    p.add_argument("--ckpt", type=Path, required=True, help="pretraining checkpoint")
    p.add_argument("--out", type=Path, required=True, help="folder for backbone.safetensors and timm.json")

    p = sub.add_parser("demo", help="the README demo: pretrain, picture, k-NN and fine-tuning vs random init, table")
    p.add_argument("--out", type=Path, help="folder for every run of the demo (default runs/demo-<time>)")
    p.add_argument("--unlabeled", action="store_true", help="pretrain on the digits as a tree of images without "
                   "labels (no class folders, no val/), and draw the picture")
    p.add_argument("--methods", default="ddmim", help="comma-separated methods to compare: ddmim, simmim, mae "
                   "(default ddmim)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every run of the demo (default 0)")

    p = sub.add_parser("config", help="print a preset's full configuration, with overrides applied")
    p.add_argument("--preset", default="seed")
    p.add_argument("--kind", choices=["pretrain", "finetune"], default="pretrain")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def cmd_train(args) -> int:
    from ddmim.data.sample_digits import build_sample_dataset, default_sample_root
    from ddmim.train.pretrain import format_summary, pretrain

    cfg = make_config(args.preset or ("tiny" if args.data is None else "seed"), args.overrides, _typed(args))
    data = args.data
    if data is None:
        data = build_sample_dataset(default_sample_root())
        print(f"using the built-in sample data set at {data}")
    if args.benchmark is not None:
        from ddmim.train.speed_test import format_benchmark, run_benchmark

        if args.benchmark < 1:
            raise UserError("--benchmark needs a positive number of steps")
        print(format_benchmark(run_benchmark(cfg, data, args.benchmark, _launch(args), data_format=args.format,
                                             results=args.out)))
        return 0
    if args.resume and args.out is None:
        raise UserError("--resume auto needs --out, the run folder to continue")
    summary = pretrain(cfg, data, _out(args, cfg.name), _launch(args), data_format=args.format,
                       resume=args.resume == "auto")
    print(format_summary(summary))
    return 0


def cmd_finetune(args) -> int:
    from ddmim.finetune_config import make_finetune_config
    from ddmim.train.finetune import finetune

    cfg = make_finetune_config(args.preset or "seed", args.overrides, _typed(args))
    if args.resume and args.out is None:
        raise UserError("--resume auto needs --out, the run folder to continue")
    s = finetune(cfg, args.data, _out(args, f"finetune-{cfg.name}"), _launch(args), ckpt=args.ckpt,
                 data_format=args.format, num_classes=args.num_classes, resume=args.resume == "auto")
    start = f"from {s['pretrained']} ({s['encoder_tensors_loaded']} encoder tensors)" if s["pretrained"] else \
        "from random init"
    print(f"fine-tuning done ({start}): top-1 {s['val_top1']:.2f}%, top-5 {s['val_top5']:.2f}% on "
          f"{s['num_classes']} classes after {s['steps']} steps; run folder {s['run_dir']}")
    return 0


def cmd_eval(args) -> int:
    from ddmim.eval.frozen import evaluate

    if args.k < 1 or args.epochs < 1 or not args.temperature > 0:
        raise UserError(f"--k and --epochs must be at least 1 and --temperature positive, got {args.k}, "
                        f"{args.epochs} and {args.temperature}")
    if args.ckpt is not None:  # the checkpoint's own model and data settings, with --set applied on top
        from ddmim.checkpoints import read_pretraining

        cfg = read_pretraining(args.ckpt, args.overrides)[0]
    else:
        cfg = make_config(args.preset, args.overrides)
    cfg.data.val_path = args.val_data or ""  # the command's data, never the one the checkpoint validated on
    result = evaluate(args.method, args.data, args.ckpt, cfg, data_format=args.format, k=args.k,
                      temperature=args.temperature, epochs=args.epochs)
    print(f"{args.method} top-1 {result['top1']:.2f}% ({result['backbone']}, {result['train_images']} train / "
          f"{result['val_images']} val images, {result['feature_dim']}-d features)")
    return 0


def cmd_visualize(args) -> int:
    from ddmim.eval.reconstruction import visualize

    result = visualize(args.ckpt, args.data, args.out, num=args.num, data_format=args.format,
                       val_path=args.val_data or "")
    print(f"wrote {result['grid']}: {result['images']} rows of {', '.join(result['panels'])}")
    return 0


def cmd_export(args) -> int:
    from ddmim.eval.export import export_backbone

    result = export_backbone(args.ckpt, args.out)
    print(f"wrote {result['weights']} ({result['tensors']} tensors); load it with:\n{result['timm']}")
    return 0


def cmd_demo(args) -> int:
    from ddmim.demo import run_demo, run_unlabeled_demo

    if args.unlabeled:
        run_unlabeled_demo(_out(args, "demo-unlabeled"))
        return 0
    run_demo(_out(args, "demo"), tuple(m.strip() for m in args.methods.split(",") if m.strip()), seed=args.seed)
    return 0


def cmd_config(args) -> int:
    if args.kind == "finetune":
        from ddmim.finetune_config import make_finetune_config

        cfg = make_finetune_config(args.preset, args.overrides)
    else:
        from ddmim.models.factory import check_pretraining

        cfg = make_config(args.preset, args.overrides)
        check_pretraining(cfg)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


HANDLERS = {"train": cmd_train, "finetune": cmd_finetune, "eval": cmd_eval, "visualize": cmd_visualize,
            "export": cmd_export, "demo": cmd_demo, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    from ddmim.train.launch import is_launched_worker
    from ddmim.train.preemption import STOPPED
    from ddmim.train.rank_notes import close_notes, open_notes

    args = build_parser().parse_args(argv)
    STOPPED.clear()  # what an earlier command of this process recorded is not this one's
    folder = None if is_launched_worker() else open_notes()
    try:
        return HANDLERS[args.command](args)
    except BaseException as exc:
        code = said(exc)
        if code is None:
            raise
        return code
    finally:
        if folder is not None:
            close_notes(folder)



if __name__ == "__main__":
    sys.exit(main())
