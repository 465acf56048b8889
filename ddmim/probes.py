"""A backbone's pooled features, and k-NN and the linear probe on them (frozen), computed where the features
are (the training accelerator when there is one) with memory bounded at ImageNet's size: the features are
stored once in `feature_dtype`, the cosine similarities and their top-k are taken in blocks of test x train
rows, and the linear probe trains in mini-batches, so no step holds more than one block of scores or one
batch of standardised features. Used by `ddmim eval` and by the online k-NN of pretraining."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pooled_features(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm backbone's average-pooled final-stage features (768-d for Swin-T), before any head."""
    return net.forward_head(net.forward_features(images), pre_logits=True)


def feature_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on an accelerator (half the memory, and its matrix units); float32 on the CPU, where the
    demo's figures are made and exact float32 ranks keep them."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


@torch.no_grad()
def nearest(train_f: torch.Tensor, test_f: torch.Tensor, k: int, *, test_block: int = 1024,
            train_block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities, train-row indices) of the `k` most similar train rows of each test row, best first,
    on train_f's device and in its dtype; scores exist one block of test_block x train_block at a time."""
    k = min(k, len(train_f))
    sims, rows = [], []
    for t0 in range(0, len(test_f), test_block):
        query = F.normalize(test_f[t0:t0 + test_block].to(train_f.device).float(), dim=1).to(train_f.dtype)
        best_s = best_i = None
        for r0 in range(0, len(train_f), train_block):
            block = F.normalize(train_f[r0:r0 + train_block].float(), dim=1).to(train_f.dtype)
            s, i = (query @ block.T).float().topk(min(k, len(block)), dim=1)
            i += r0
            if best_s is not None:  # the k best of (the k best so far) and (this block's k best)
                s, order = torch.cat([best_s, s], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, order)
            best_s, best_i = s, i
        sims.append(best_s)
        rows.append(best_i)
    return torch.cat(sims), torch.cat(rows)


@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes: int, k: int = 20, temperature: float = 0.07,
                **blocks) -> torch.Tensor:
    """Class of each test row: its k most cosine-similar train rows vote with weight exp(sim / T)."""
    sims, rows = nearest(train_f, test_f, k, **blocks)
    train_y = train_y.to(sims.device)
    votes = torch.zeros(len(sims), num_classes, device=sims.device)
    return votes.scatter_add_(1, train_y[rows], (sims / temperature).exp()).argmax(dim=1)


@torch.no_grad()
def standardiser(train_f: torch.Tensor, block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the train rows (float32 sums over blocks; the unbiased std)."""
    total = torch.zeros(train_f.shape[1], dtype=torch.float64, device=train_f.device)
    squares = torch.zeros_like(total)
    for r0 in range(0, len(train_f), block):
        rows = train_f[r0:r0 + block].double()
        total += rows.sum(0)
        squares += rows.square().sum(0)
    n = len(train_f)
    mean = total / n
    var = (squares - n * mean.square()) / max(n - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float() + 1e-6


def linear_probe(train_f, train_y, val_f, val_y, num_classes: int, epochs: int = 100, lr: float = 1e-2,
                 seed: int = 0, batch: int = 4096) -> float:
    """Top-1 % of a linear classifier trained on frozen, standardised features with AdamW, in mini-batches of
    `batch` rows drawn in a seeded order (a data set of at most `batch` rows trains full-batch)."""
    device = train_f.device
    torch.manual_seed(seed)
    mean, std = standardiser(train_f)
    head = torch.nn.Linear(train_f.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    train_y = train_y.to(device)
    for _ in range(epochs):
        picks = torch.randperm(len(train_f), generator=order).to(device) if len(train_f) > batch else None
        for b0 in range(0, len(train_f), batch):
            idx = picks[b0:b0 + batch] if picks is not None else slice(None)
            x = (train_f[idx].float() - mean) / std
            opt.zero_grad()
            F.cross_entropy(head(x), train_y[idx]).backward()
            opt.step()
    correct = 0
    with torch.no_grad():
        for b0 in range(0, len(val_f), batch):
            x = (val_f[b0:b0 + batch].to(device).float() - mean) / std
            correct += (head(x).argmax(1).cpu() == val_y[b0:b0 + batch].cpu()).sum().item()
    return 100.0 * correct / len(val_f)
