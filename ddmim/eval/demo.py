"""`ddmim demo`: the README's end-to-end run on the built-in digits sample set, on the CPU.

Pretrain the tiny preset, draw the reconstruction picture, compare the pretrained backbone with a
random-init one by k-NN and by fine-tuning, and print one table.
"""
from __future__ import annotations

import json
from pathlib import Path

from ddmim.config import make_config
from ddmim.data import eval_batches
from ddmim.eval.frozen import evaluate
from ddmim.eval.reconstruction import load_model, reconstruction_report, visualize
from ddmim.finetune_config import make_finetune_config
from ddmim.train.finetune import finetune
from ddmim.train.launch import Launch
from ddmim.train.pretrain import format_summary, pretrain
from ddmim.train.run_folder import prepare_run_dir
from ddmim_data_prep.sample_data import build_sample_dataset, default_sample_root


def run_demo(out: Path) -> dict:
    out = prepare_run_dir(Path(out))
    data = build_sample_dataset(default_sample_root())
    print(f"sample data set: {data}")
    quiet = Launch(progress_bar=False)
    pre = pretrain(make_config("tiny"), data, out / "pretrain", quiet)
    print(format_summary(pre))
    ckpt = Path(pre["checkpoint_last"])
    grid = visualize(ckpt, data, out / "reconstructions.png")
    model, cfg = load_model(ckpt)
    recon = reconstruction_report(model, eval_batches(data, cfg, "val"), seed=cfg.train.seed)
    knn = {name: evaluate("knn", data, c, make_config("tiny"))["top1"] for name, c in (("pretrained", ckpt),
                                                                                      ("random init", None))}
    ft = {name: finetune(make_finetune_config("tiny"), data, out / f"finetune-{name.replace(' ', '-')}", quiet,
                         ckpt=c)["val_top1"] for name, c in (("pretrained", ckpt), ("random init", None))}
    summary = {"pretrain": pre, "reconstruction": recon, "knn_top1": knn, "finetune_top1": ft, "grid": grid["grid"]}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"{'backbone':<14}{'k-NN top-1 %':>14}{'fine-tune top-1 %':>19}")
    for name in ("pretrained", "random init"):
        print(f"{name:<14}{knn[name]:>14.1f}{ft[name]:>19.1f}")
    print(f"masked-pixel reconstruction loss on val: {recon['recon_loss']:.4f} vs {recon['baseline_loss']:.4f} for "
          f"the mean-visible-colour baseline ({recon['ratio']:.2f}x)")
    print(f"reconstruction picture: {grid['grid']}  (rows: original | masked input | reconstruction | pasted)")
    print(f"everything: {out} (demo.json, pretrain/, finetune-*/)")
    return summary
