"""Frozen-feature evaluation of a backbone: k-NN (cosine, temperature-weighted votes) and a linear probe."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ddmim.data import eval_batches
from ddmim.eval.features import load_backbone, pooled_features


@torch.no_grad()
def extract(net, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    net.to(device)
    feats, labels = [], []
    for images, y in batches:
        feats.append(pooled_features(net, images.to(device)).float().cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_f, train_y, test_f, num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk: int = 1024) -> torch.Tensor:
    """Class of each test row: the k most cosine-similar train rows vote with weight exp(sim / T)."""
    train_f = F.normalize(train_f, dim=1)
    preds = []
    for start in range(0, len(test_f), chunk):
        sims = F.normalize(test_f[start:start + chunk], dim=1) @ train_f.T
        top, idx = sims.topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def linear_probe(train_f, train_y, val_f, val_y, num_classes: int, epochs: int = 100, lr: float = 1e-2,
                 seed: int = 0) -> float:
    """Top-1 % of a linear classifier trained on frozen, standardised features (full-batch AdamW)."""
    torch.manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    x, xv = (train_f - mean) / std, (val_f - mean) / std
    head = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * (head(xv).argmax(1) == val_y).float().mean().item()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    dev = device or default_device()
    train_f, train_y = extract(net, eval_batches(data, cfg, "train", data_format, device=dev, labels=True), dev)
    val_f, val_y = extract(net, eval_batches(data, cfg, "val", data_format, device=dev, labels=True), dev)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    if method == "knn":
        predicted = knn_predict(train_f, train_y, val_f, num_classes, k, temperature)
        top1 = 100.0 * (predicted == val_y).float().mean().item()
    else:
        top1 = linear_probe(train_f, train_y, val_f, val_y, num_classes, epochs=epochs, seed=cfg.train.seed)
    return {"method": method, "top1": top1, "train_images": len(train_y), "val_images": len(val_y),
            "feature_dim": train_f.shape[1]}
