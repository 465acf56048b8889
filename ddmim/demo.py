"""`ddmim demo`: the README's end-to-end run on the built-in digits sample set, on the CPU.

For each chosen method (DDMIM by default; SimMIM and MAE too with --methods): pretrain its tiny preset,
draw the reconstruction picture, measure k-NN and fine-tuning top-1; then the same for a random-init
backbone; print one table.
"""
from __future__ import annotations

import json
from pathlib import Path

from ddmim.atomic import write_text
from ddmim.config import make_config
from ddmim.data import eval_batches
from ddmim.data.sample_digits import build_sample_dataset, build_unlabeled_sample, default_sample_root
from ddmim.errors import UserError
from ddmim.eval.features import load_backbone
from ddmim.eval.frozen import few_label_knn
from ddmim.eval.reconstruction import load_model, reconstruction_report, visualize
from ddmim.finetune_config import make_finetune_config
from ddmim.train.curves import read_series
from ddmim.train.finetune import finetune
from ddmim.train.launch import Launch
from ddmim.train.pretrain import format_summary, pretrain
from ddmim.train.run_folder import prepare_run_dir

# method -> (pretraining preset, fine-tuning preset), all at the digits' 32 px
METHODS = {"ddmim": ("tiny", "tiny"), "simmim": ("tiny_simmim", "tiny"), "mae": ("tiny_mae", "tiny_linear")}
LAST_EPOCHS = 3  # the fine-tuning figure: the mean validation top-1 of the last epochs, not one epoch's
# k-NN's references: 10 labelled images per class. With all 1,442 a random backbone's neighbours are right 92% of
# the time and pretraining adds 1 to 3 points, within the spread of seeds; with few labels the features decide.
# One draw of 10 moved the figure by 3 points with the thread count of pretraining; the mean of 8 disjoint draws by 0.1.
KNN_LABELS_PER_CLASS, KNN_DRAWS = 10, 8


def finetune_top1(summary: dict) -> float:
    """The mean val/top1 of a fine-tuning run's last `LAST_EPOCHS` validations."""
    values = [value for _, value in read_series(Path(summary["logs"]))["val/top1"][-LAST_EPOCHS:]]
    return sum(values) / len(values)


def knn_top1(ckpt: Path | None, cfg, data: Path) -> float:
    """The k-NN column: a checkpoint's backbone (None: a random one seeded by cfg) with few labelled references."""
    net, cfg = load_backbone(ckpt, cfg, seed=cfg.train.seed)
    return few_label_knn(net, cfg, data, KNN_LABELS_PER_CLASS, KNN_DRAWS)["top1"]


def run_demo(out: Path, methods: tuple[str, ...] = ("ddmim",), seed: int = 0) -> dict:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods takes a comma-separated list of {', '.join(METHODS)}, got {','.join(methods)}")
    out = prepare_run_dir(Path(out))
    data = build_sample_dataset(default_sample_root())
    print(f"sample data set: {data}")
    quiet = Launch(progress_bar=False)
    rows, seeded = {}, [f"train.seed={seed}"]
    summary = {"methods": {}, "seed": seed, "knn_labels_per_class": KNN_LABELS_PER_CLASS, "knn_draws": KNN_DRAWS}
    for method in methods:
        pre_preset, ft_preset = METHODS[method]
        # val/knn_top1 every epoch: the representation watched while it trains
        pre = pretrain(make_config(pre_preset, ["eval.every_epochs=1", *seeded]), data, out / method / "pretrain",
                       quiet)
        print(format_summary(pre))
        ckpt = Path(pre["checkpoint_last"])
        grid = visualize(ckpt, data, out / method / "reconstructions.png")
        model, cfg = load_model(ckpt)
        recon = reconstruction_report(model, eval_batches(data, cfg, "val"), seed=cfg.train.seed)
        knn = knn_top1(ckpt, cfg, data)
        ft = finetune_top1(finetune(make_finetune_config(ft_preset, seeded), data, out / method / "finetune", quiet,
                                    ckpt=ckpt))
        rows[method] = (knn, ft, recon["ratio"])
        summary["methods"][method] = {"pretrain": pre, "reconstruction": recon, "knn_top1": knn,
                                      "finetune_top1": ft, "grid": grid["grid"]}
    random_knn = knn_top1(None, make_config("tiny", seeded), data)
    random_ft = finetune_top1(finetune(make_finetune_config("tiny", seeded), data, out / "random-init" / "finetune",
                                       quiet))
    rows["random init"] = (random_knn, random_ft, None)
    summary["random_init"] = {"knn_top1": random_knn, "finetune_top1": random_ft}
    write_text(out / "demo.json", json.dumps(summary, indent=2))
    print()
    print(f"{'backbone':<14}{'k-NN top-1 %':>14}{'fine-tune top-1 %':>19}{'recon vs baseline':>19}")
    for name, (knn, ft, ratio) in rows.items():
        print(f"{name:<14}{knn:>14.1f}{ft:>19.1f}{f'{ratio:.2f}x' if ratio is not None else '-':>19}")
    print(f"k-NN top-1: {KNN_LABELS_PER_CLASS} labelled training images per class as references, the mean of "
          f"{KNN_DRAWS} disjoint draws; fine-tune top-1: all labels, the mean of the last {LAST_EPOCHS} epochs' "
          f"validation; seed {seed} (--seed)")
    print("recon vs baseline: masked reconstruction loss on val over a trivial predictor's: each image's mean "
          "visible colour (ddmim, simmim); each masked patch's mean (mae, whose loss is on normalised patches)")
    for method in methods:
        print(f"reconstruction picture ({method}): {summary['methods'][method]['grid']}  "
              "(rows: original | masked input | reconstruction | pasted)")
    print(f"everything: {out} (demo.json, <method>/pretrain, <method>/finetune, random-init/)")
    return summary


def run_unlabeled_demo(out: Path) -> dict:
    """Pretraining on images without labels: the digits as a folder tree without classes, a tenth held out for
    validation by the hash of each path; the picture shows what was learnt."""
    out = prepare_run_dir(Path(out))
    data = build_unlabeled_sample(build_sample_dataset(default_sample_root()),
                                  default_sample_root().with_name("sample-digits-unlabeled"))
    print(f"unlabeled sample: {data} (the digits in 8 folders, no classes, no val/)")
    cfg = make_config("tiny", ["data.val_fraction=0.1"])  # 180 of 1,797 images: a steadier validation loss
    pre = pretrain(cfg, data, out / "pretrain", Launch(progress_bar=False))
    print(format_summary(pre))
    grid = visualize(Path(pre["checkpoint_last"]), data, out / "reconstructions.png")
    print(f"reconstruction picture: {grid['grid']}  (rows: original | masked input | reconstruction | pasted)")
    print("k-NN, the linear probe and fine-tuning need labels: give them class folders (ddmim demo does)")
    return {"pretrain": pre, "grid": grid["grid"]}
