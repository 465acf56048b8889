"""Frozen-feature evaluation of a backbone: its features extracted onto the evaluation device, then k-NN
(cosine, temperature-weighted votes) or a linear probe there (`ddmim/probes.py`)."""
from __future__ import annotations

from pathlib import Path

import torch

from ddmim.data import eval_batches
from ddmim.errors import UserError
from ddmim.eval.features import load_backbone
from ddmim.probes import feature_dtype, knn_predict, linear_probe, pooled_features


@torch.no_grad()
def extract(net, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, stored on `device` in its `feature_dtype`; labels, on the CPU)."""
    net.to(device)
    feats, labels = [], []
    for images, y in batches:
        feats.append(pooled_features(net, images.to(device)).to(feature_dtype(device)))
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def split_features(net, cfg, data: Path, data_format: str, dev: torch.device):
    """(train features, train labels, val features, val labels) of a labelled source, each split in its fixed
    order."""
    train_f, train_y = extract(net, eval_batches(data, cfg, "train", data_format, device=dev, labels=True), dev)
    val_f, val_y = extract(net, eval_batches(data, cfg, "val", data_format, device=dev, labels=True), dev)
    return train_f, train_y, val_f, val_y


def evaluate(method: str, data: Path, ckpt: Path | None, cfg, *, data_format: str = "auto", k: int = 20,
             temperature: float = 0.07, epochs: int = 100, device: torch.device | None = None) -> dict:
    """cfg: the run config whose .model shapes the backbone and whose .data and .train.batch_size give the
    evaluation loader (with a checkpoint: the checkpoint's config, which must describe the same backbone).
    Runs on the GPU when there is one. Nothing given is changed."""
    net, _ = load_backbone(ckpt, cfg, seed=cfg.train.seed)
    result = evaluate_backbone(method, net, cfg, data, data_format=data_format, k=k, temperature=temperature,
                               epochs=epochs, device=device)
    return {**result, "backbone": str(ckpt) if ckpt else "random init"}


def evaluate_backbone(method: str, net, cfg, data: Path, *, data_format: str = "auto", k: int = 20,
                      temperature: float = 0.07, epochs: int = 100, device: torch.device | None = None) -> dict:
    """k-NN or linear-probe top-1 of a frozen backbone (its weights are only read; it is moved to `device`)."""
    train_f, train_y, val_f, val_y = split_features(net, cfg, data, data_format, device or default_device())
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    if method == "knn":
        predicted = knn_predict(train_f, train_y, val_f, num_classes, k, temperature).cpu()
        top1 = 100.0 * (predicted == val_y).float().mean().item()
    else:
        top1 = linear_probe(train_f, train_y, val_f, val_y, num_classes, epochs=epochs, seed=cfg.train.seed)
    return {"method": method, "top1": top1, "train_images": len(train_y), "val_images": len(val_y),
            "feature_dim": train_f.shape[1]}


def few_label_knn(net, cfg, data: Path, per_class: int, draws: int, *, data_format: str = "auto", k: int = 20,
                  temperature: float = 0.07, device: torch.device | None = None) -> dict:
    """k-NN top-1 with `per_class` labelled training images of each class as references, the mean over `draws`
    disjoint draws: draw d takes images [d * per_class, (d + 1) * per_class) of each class in the split's fixed
    order. One draw's figure moves by several points with the images it happened to get, and with the arithmetic
    of the run that trained the backbone; the mean of several does not."""
    dev = device or default_device()
    train_f, train_y, val_f, val_y = split_features(net, cfg, data, data_format, dev)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    members = [(train_y == c).nonzero().flatten() for c in range(num_classes)]
    short = {c: len(m) for c, m in enumerate(members) if len(m) < per_class * draws}
    if short:
        raise UserError(f"{draws} draws of {per_class} labelled images per class need {per_class * draws} images of "
                        f"each class in {data}/train; these have fewer (class index: images): {short}")
    top1 = []
    for d in range(draws):
        rows = torch.cat([m[d * per_class:(d + 1) * per_class] for m in members])
        predicted = knn_predict(train_f[rows.to(train_f.device)], train_y[rows], val_f, num_classes, k,
                                temperature).cpu()
        top1.append(100.0 * (predicted == val_y).float().mean().item())
    return {"top1": sum(top1) / draws, "draws_top1": top1, "per_class": per_class, "val_images": len(val_y)}
