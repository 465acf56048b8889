"""Training-loader throughput: torchvision ImageFolder (the baseline) vs FFCV vs DALI, same photographs.

    python benchmarks/bench_loaders.py [--sizes 224 64] [--epochs 3] [--workers 2] [--max-resolution 256]

Data: 2,000 JPEG photographs (400-500 px, quality 90) from data_prep/photo_sample.py, converted once with
data_prep/to_ffcv.py and to_dali.py (at --max-resolution). Every loader does the training augmentation
(RandomResizedCrop(size), flip, ImageNet normalisation, float32 NCHW batches); the baseline reads the
unconverted JPEG folder with --workers processes. Each loader runs one warm-up epoch first (reported
separately: FFCV compiles its pipeline with numba then), then --epochs timed epochs; the figure is the
median epoch's images/s, and each is compared with the baseline's in the same run.
Writes benchmarks/results/loaders-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ddmim.config import make_config
from ddmim.data.dali_loader import open_loader
from ddmim.data.ffcv_loader import make_loader
from ddmim.data.folder import open_split
from ddmim.data.transforms import train_transform
from ddmim_benchmarks.common import write_results
from ddmim_data_prep import to_dali, to_ffcv
from ddmim_data_prep.photo_sample import build_photo_dataset

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddmim" / "bench"


def prepare(cache: Path, max_resolution: int, workers: int) -> tuple[dict[str, Path], dict[str, float]]:
    """The photographs and their two conversions (cached); converter images/s when they ran in this run."""
    photos = build_photo_dataset(cache / "photos-2000")
    paths = {"folder": photos, "ffcv": cache / f"ffcv-{max_resolution}", "dali": cache / f"dali-{max_resolution}"}
    options = ["--max-resolution", str(max_resolution), "--workers", str(workers), "--splits", "train"]
    converter_rates = {}
    outputs = (("ffcv", to_ffcv, paths["ffcv"] / "train.beton"), ("dali", to_dali, paths["dali"] / "train"))
    for name, module, done in outputs:
        if not done.exists():
            start = time.perf_counter()
            module.main([str(photos), str(paths[name]), *options])
            converter_rates[name] = 2000 / (time.perf_counter() - start)
    return paths, converter_rates


def make(name: str, paths: dict[str, Path], cfg, device: torch.device, workers: int):
    if name == "folder":
        dataset = open_split(paths["folder"], "train", train_transform(cfg.model.img_size, cfg.data))
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                           num_workers=workers, persistent_workers=True,
                                           pin_memory=device.type == "cuda")
    if name == "ffcv":
        return make_loader(paths["ffcv"] / "train.beton", cfg, train=True, device=device)
    return open_loader(paths["dali"] / "train", cfg, train=True, gpu=device.type == "cuda", threads=workers)


def epoch(loader, device: torch.device) -> tuple[float, int, tuple]:
    start = time.perf_counter()
    images = 0
    for x, _ in loader:
        images += len(x)
        shape = (tuple(x.shape), str(x.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, images, shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-resolution", type=int, default=256,
                        help="converters' longest stored side (default 256: decoding time grows with stored size)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the photographs and conversions live")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    paths, converter_rates = prepare(args.cache, args.max_resolution, args.workers)
    prep_s = time.perf_counter() - start
    rows = []
    for size in args.sizes:
        cfg = make_config("seed", [f"model.img_size={size}", f"train.batch_size={args.batch}",
                                   f"data.num_workers={args.workers}"])
        for name in ("folder", "ffcv", "dali"):
            start = time.perf_counter()
            loader = make(name, paths, cfg, device, args.workers)
            warm_s, _, shape = epoch(loader, device)
            startup_s = time.perf_counter() - start
            timed = [epoch(loader, device) for _ in range(args.epochs)]
            rates = [n / s for s, n, _ in timed]
            rows.append({"loader": name, "size": size, "batch": args.batch, "workers": args.workers,
                         "first_epoch_s": startup_s, "images_per_epoch": timed[0][1],
                         "epoch_s": [s for s, _, _ in timed],
                         "images_per_s": statistics.median(rates), "batch_shape": shape[0], "dtype": shape[1]})
            del loader
        base = next(r["images_per_s"] for r in rows if r["loader"] == "folder" and r["size"] == size)
        for r in rows:
            if r["size"] == size:
                r["x_baseline"] = r["images_per_s"] / base

    print(f"device {device}, {args.workers} workers, batch {args.batch}, stored max {args.max_resolution} px "
          f"(photographs, conversions: {prep_s:.0f} s incl. cache)")
    print(f"{'loader':<8}{'size':>6}{'images/s':>10}{'x baseline':>12}{'first epoch s':>15}")
    for r in rows:
        print(f"{r['loader']:<8}{r['size']:>6}{r['images_per_s']:>10.1f}{r['x_baseline']:>12.2f}"
              f"{r['first_epoch_s']:>15.1f}")
    for name, rate in converter_rates.items():
        print(f"converter {name}: {rate:.0f} images/s (2,000 photographs, scan + write)")
    path = write_results("loaders", {"device": str(device), "max_resolution": args.max_resolution,
                                     "epochs": args.epochs, "converter_images_per_s": converter_rates,
                                     "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
