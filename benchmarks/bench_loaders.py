"""Loaders and converters at the stored resolutions a user would pick, against torchvision and against the plain
FFCV and DALI libraries on the same files.

    python benchmarks/bench_loaders.py [--resolutions 256 320 384 512] [--epochs 3] [--workers 2]

Data: 2,000 JPEG photographs (400-500 px, quality 90) from data_prep/photo_sample.py. For each
--max-resolution the photographs are converted by ddmim's to_ffcv.py and to_dali.py and, for comparison, by
FFCV's own DatasetWriter fed with torchvision's ImageFolder (medians of --conversions interleaved runs,
after an untimed 64-image run of each).
Every loader does the training augmentation at --size (RandomResizedCrop, flip, ImageNet normalisation,
float32 NCHW batches): torchvision's ImageFolder on the source JPEGs (bilinear, the baseline), ddmim's FFCV
and DALI loaders, and plain FFCV / plain DALI pipelines written from their documentation (the same
decoders, no ddmim wrapper). After one warm-up epoch each (FFCV compiles then), the timed epochs are
interleaved, one epoch of each loader per round, so that a busy machine slows all of them alike; figures
are medians over rounds, ratios within this run. Writes benchmarks/results/loaders-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import write_results
from benchmarks.loader_epochs import plain_dali, plain_ffcv
from data_prep import to_dali, to_ffcv
from data_prep.photo_sample import build_photo_dataset
from ddmim.config import make_config
from ddmim.data.dali_loader import open_loader
from ddmim.data.ffcv_loader import make_loader
from ddmim.data.folder import open_split
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.transforms import train_transform

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddmim" / "bench"
GOALS = {"ffcv": 4.0, "dali": 3.0}  # images/s over torchvision's at the recommended resolution
RECOMMENDED = 256  # the README's ImageNet command: the one stored size that met both loader goals here


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ffcv_writer(photos: Path, dst: Path, resolution: int, workers: int, count: int | None = None) -> None:
    """FFCV's own DatasetWriter over torchvision's ImageFolder: the reference a converter is held to."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=resolution, jpeg_quality=90),
              "label": IntField()}
    dataset = ImageFolder(str(photos / "train"))
    DatasetWriter(str(dst), fields, num_workers=workers).from_indexed_dataset(
        dataset, indices=list(range(count or len(dataset))))


def convert(photos: Path, cache: Path, resolution: int, workers: int, repeats: int) -> tuple[dict[str, Path], dict]:
    """ddmim's two conversions at `resolution` (kept in the cache) and FFCV's writer: each first converts 64
    images untimed (imports, worker start-up), then all 2,000 `repeats` times, the three interleaved; the
    medians' images/s, and the outputs' sizes."""
    paths = {"ffcv": cache / f"ffcv-{resolution}", "dali": cache / f"dali-{resolution}"}
    options = ["--max-resolution", str(resolution), "--workers", str(workers), "--splits", "train", "--overwrite"]
    writer_out = cache / f"writer-{resolution}.beton"
    jobs = {"ffcv_converter": lambda extra=(): to_ffcv.main([str(photos), str(paths["ffcv"]), *options, *extra]),
            "dali_converter": lambda extra=(): to_dali.main([str(photos), str(paths["dali"]), *options, *extra]),
            "ffcv_writer": lambda extra=(): ffcv_writer(photos, writer_out, resolution, workers,
                                                        count=64 if extra else None)}
    for job in jobs.values():
        job(("--subset", "64"))
    seconds = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            seconds[name].append(timed(job))
    writer_out.unlink()
    rates = {name: 2000 / statistics.median(s) for name, s in seconds.items()}
    sizes = {"ffcv_mib": (paths["ffcv"] / "train.beton").stat().st_size / 2**20,
             "dali_mib": sum(p.stat().st_size for p in (paths["dali"] / "train").glob("*.tar")) / 2**20}
    return paths, {**rates, **sizes}


def epoch(loader) -> tuple[float, int]:
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch[0]["images"]) if isinstance(batch[0], dict) else len(batch[0])
    return time.perf_counter() - start, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 320, 384, 512])
    parser.add_argument("--size", type=int, default=224, help="training crop size (default 224)")
    parser.add_argument("--epochs", type=int, default=3, help="timed, interleaved epochs per loader (default 3)")
    parser.add_argument("--conversions", type=int, default=3, help="timed, interleaved conversions per converter")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the photographs and conversions live")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        print("note: every loader here decodes on the CPU; GPU decoding is timed by `ddmim train --benchmark`")

    photos = build_photo_dataset(args.cache / "photos-2000")
    cfg = make_config("seed", [f"model.img_size={args.size}", f"train.batch_size={args.batch}",
                               f"data.num_workers={args.workers}"])
    cpu = torch.device("cpu")
    loaders = {"torchvision": torch.utils.data.DataLoader(
        open_split(photos, "train", train_transform(args.size, cfg.data)), batch_size=args.batch, shuffle=True,
        drop_last=True, num_workers=args.workers, persistent_workers=True)}
    conversions = {}
    for resolution in args.resolutions:
        paths, conversions[resolution] = convert(photos, args.cache, resolution, args.workers, args.conversions)
        spec = LoaderSpec.of(cfg)
        loaders[f"ddmim ffcv {resolution}"] = make_loader(paths["ffcv"] / "train.beton", spec, train=True, device=cpu)
        loaders[f"plain ffcv {resolution}"] = plain_ffcv(paths["ffcv"] / "train.beton", cfg, args.workers)
        loaders[f"ddmim dali {resolution}"] = open_loader(paths["dali"] / "train", spec, train=True, gpu=False,
                                                          threads=args.workers)
        loaders[f"plain dali {resolution}"] = plain_dali(paths["dali"] / "train", cfg, args.workers)
    first = {name: epoch(loader)[0] for name, loader in loaders.items()}  # warm-up (FFCV compiles here)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.epochs):
        for name, loader in loaders.items():
            seconds, images = epoch(loader)
            rates[name].append(images / seconds)
    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median["torchvision"]

    print(f"{args.workers} workers, batch {args.batch}, {args.size} px crops, 2,000 photographs, medians of "
          f"{args.epochs} interleaved epochs")
    print(f"{'max res':>8}{'FFCV img/s':>12}{'x tv':>7}{'x plain':>9}{'DALI img/s':>12}{'x tv':>7}{'x plain':>9}"
          f"{'FFCV MiB':>10}{'DALI MiB':>10}{'conv FFCV':>11}{'conv DALI':>11}{'writer':>8}")
    rows = []
    for res in args.resolutions:
        f, d, c = median[f"ddmim ffcv {res}"], median[f"ddmim dali {res}"], conversions[res]
        row = {"max_resolution": res, "ffcv_images_per_s": f, "ffcv_x_torchvision": f / base,
               "ffcv_x_plain": f / median[f"plain ffcv {res}"], "dali_images_per_s": d, "dali_x_torchvision": d / base,
               "dali_x_plain": d / median[f"plain dali {res}"], **c,
               "ffcv_converter_x_writer": c["ffcv_converter"] / c["ffcv_writer"],
               "dali_converter_x_writer": c["dali_converter"] / c["ffcv_writer"]}
        rows.append(row)
        print(f"{res:>8}{f:>12.0f}{row['ffcv_x_torchvision']:>7.2f}{row['ffcv_x_plain']:>9.2f}{d:>12.0f}"
              f"{row['dali_x_torchvision']:>7.2f}{row['dali_x_plain']:>9.2f}{c['ffcv_mib']:>10.1f}{c['dali_mib']:>10.1f}"
              f"{row['ffcv_converter_x_writer']:>10.2f}x{row['dali_converter_x_writer']:>10.2f}x"
              f"{c['ffcv_writer']:>8.0f}")
    print(f"torchvision ImageFolder on the source JPEGs: {base:.0f} images/s; converters: images/s of ddmim's "
          "converter over FFCV's DatasetWriter's ('writer', images/s) on the same photographs")
    goals = []
    recommended = next((r for r in rows if r["max_resolution"] == RECOMMENDED), None)
    if recommended:
        for name, goal in GOALS.items():
            got = recommended[f"{name}_x_torchvision"]
            goals.append({"goal": f"{name} >= {goal}x torchvision at {RECOMMENDED} px", "got": got, "met": got >= goal})
        for name in ("ffcv", "dali"):
            got = recommended[f"{name}_converter_x_writer"]
            goals.append({"goal": f"{name} converter >= 1.0x FFCV's writer", "got": got, "met": got >= 1.0})
    for g in goals:
        print(f"goal {g['goal']}: {g['got']:.2f}x ({'met' if g['met'] else 'NOT met'})")
    path = write_results("loaders", {"workers": args.workers, "batch": args.batch, "size": args.size,
                                     "epochs": args.epochs, "torchvision_images_per_s": base, "rows": rows,
                                     "first_epoch_s": first, "all_rates": rates, "goals": goals})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
