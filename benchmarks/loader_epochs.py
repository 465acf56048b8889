"""One training loader's epochs, timed in a process of its own (benchmarks/compare_loaders.py runs it).

    python benchmarks/loader_epochs.py {ddmim,plain} {folder,ffcv,dali} DATA [--batch 64] [--workers 2]
        [--size 224] [--epochs 2]

`ddmim`: the training loader of whichever ddmim the import path finds (`make_datamodule(...)
.train_dataloader()`, the call every ddmim version has), so an earlier commit's is timed the same way.
`plain`: the same augmentation (the `seed` preset's RandomResizedCrop, flip 0.5, ImageNet normalisation,
float32 NCHW) written with the library alone, as its documentation shows: torchvision's ImageFolder and
DataLoader, `ffcv.Loader` with FFCV's own decoder and flip, a DALI webdataset pipeline. DATA is the photo
folder (folder), the .beton folder (ffcv) or the DALI shard folder (dali). After one untimed epoch (FFCV
compiles in it, workers start), prints one JSON line: images/s of each timed epoch and the ddmim file used.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def plain_folder(root: Path, cfg, workers: int):
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    size = cfg.model.img_size
    crop = T.RandomResizedCrop(size, scale=tuple(cfg.data.crop_scale), ratio=tuple(cfg.data.crop_ratio))
    transform = T.Compose([crop, T.RandomHorizontalFlip(cfg.data.hflip), T.ToTensor(),
                           T.Normalize(cfg.data.mean, cfg.data.std)])
    return torch.utils.data.DataLoader(ImageFolder(str(root / "train"), transform), batch_size=cfg.train.batch_size,
                                       shuffle=True, drop_last=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def plain_ffcv(path: Path, cfg, workers: int):
    """FFCV's documented ImageNet training pipeline on the CPU (normalisation before ToTensor: ffcv 1.0.2 never
    finishes compiling the opposite order on the CPU)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    size = cfg.model.img_size
    mean, std = np.array(cfg.data.mean) * 255, np.array(cfg.data.std) * 255
    image = [RandomResizedCropRGBImageDecoder((size, size), scale=tuple(cfg.data.crop_scale),
                                              ratio=tuple(cfg.data.crop_ratio)),
             RandomHorizontalFlip(cfg.data.hflip), NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    return Loader(str(path), batch_size=cfg.train.batch_size, num_workers=workers, order=OrderOption.RANDOM,
                  os_cache=True, drop_last=True, pipelines={"image": image, "label": [IntDecoder(), ToTensor()]})


def plain_dali(folder: Path, cfg, workers: int):
    """DALI's documented webdataset training pipeline on the CPU (crop-window decoding, linear resize)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    tars = sorted(str(p) for p in folder.glob("*.tar"))
    size = cfg.model.img_size

    @pipeline_def
    def pipeline():
        jpegs, labels = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                              ext=["jpg", "cls"], dtypes=[types.UINT8, types.INT32],
                                              random_shuffle=True, name="Reader")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=list(cfg.data.crop_scale),
                                               random_aspect_ratio=list(cfg.data.crop_ratio))
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=False)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[m * 255 for m in cfg.data.mean], std=[s * 255 for s in cfg.data.std],
                                          mirror=fn.random.coin_flip(probability=cfg.data.hflip))
        return images, labels

    pipe = pipeline(batch_size=cfg.train.batch_size, num_threads=workers, device_id=None)
    pipe.build()
    return DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader",
                               last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)


PLAIN = {"folder": plain_folder, "ffcv": lambda root, cfg, workers: plain_ffcv(root / "train.beton", cfg, workers),
         "dali": lambda root, cfg, workers: plain_dali(root / "train", cfg, workers)}


def epoch(loader) -> tuple[float, int]:
    """(seconds, images) of one pass; every batch is touched as training would (its first value read)."""
    start, images = time.perf_counter(), 0
    for batch in loader:
        x = batch[0]["images"] if isinstance(batch[0], dict) else batch[0]
        images += len(x)
        float(x[0, 0, 0, 0])
    return time.perf_counter() - start, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("ddmim", "plain"))
    parser.add_argument("format", choices=tuple(PLAIN))
    parser.add_argument("data", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)

    import ddmim
    from ddmim.config import make_config

    cfg = make_config("seed", [f"model.img_size={args.size}", f"train.batch_size={args.batch}",
                               f"data.num_workers={args.workers}"])
    if args.kind == "ddmim":
        from ddmim.data import make_datamodule

        loader = make_datamodule(args.data, cfg, args.format).train_dataloader()
    else:
        loader = PLAIN[args.format](args.data, cfg, args.workers)
    epoch(loader)
    rates = []
    for _ in range(args.epochs):
        seconds, images = epoch(loader)
        rates.append(images / seconds)
    print(json.dumps({"images_per_s": rates, "ddmim": ddmim.__file__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
