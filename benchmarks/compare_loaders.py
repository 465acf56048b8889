"""ddmim's training loaders against their plain libraries, and against an earlier commit's, in one run.

    python benchmarks/compare_loaders.py [--formats folder ffcv dali] [--resolution 256] [--rounds 5]
        [--images 2000] [--epochs 2] [--batch 64] [--workers 2] [--base REV] [--guard 0.85] [--json PATH]

Data: --images photographs (data_prep/photo_sample.py, 400-500 px JPEGs) and their FFCV and DALI conversions
at --resolution, made once by this tree's converters and kept under ~/.cache/ddmim/bench. Contenders per
format: ddmim's training loader (`make_datamodule(...).train_dataloader()`), the plain library doing the same
augmentation (torchvision ImageFolder, `ffcv.Loader`, a DALI pipeline; benchmarks/loader_epochs.py), and with
--base the earlier commit's ddmim loader (exported with `git archive`). Each measurement is a fresh process
(benchmarks/loader_epochs.py) that imports one tree's ddmim only (checked) and times --epochs epochs after an
untimed one. Rounds run every contender once, in an order rotated each round; a contender's figure is the
median over rounds, a ratio both the ratio of medians and the median of per-round ratios (whose min-max is the
spread). --guard X exits 1 when a ddmim loader's median per-round ratio to its plain library is below X: a
round's two figures are measured minutes apart at most, so a slow spell of the machine moves both.
Writes benchmarks/results/loader-compare-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import write_results
from benchmarks.compare_commits import ROOT, import_root, two_trees
from data_prep import to_dali, to_ffcv
from data_prep.photo_sample import build_photo_dataset

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddmim" / "bench"
EPOCHS_SCRIPT = Path(__file__).resolve().parent / "loader_epochs.py"


def prepare(images: int, resolution: int, workers: int) -> dict[str, Path]:
    """{format: the folder its loaders read}: photographs, and their conversions by this tree."""
    photos = build_photo_dataset(CACHE / f"photos-{images}", n_train=images, n_val=64)
    data = {"folder": photos}
    for fmt, converter in (("ffcv", to_ffcv), ("dali", to_dali)):
        out = CACHE / f"compare-{images}-{resolution}" / fmt
        complete = out.parent / f"{fmt}.complete"
        if not complete.exists():
            if converter.main([str(photos), str(out), "--max-resolution", str(resolution), "--workers", str(workers),
                               "--overwrite"]) != 0:
                raise SystemExit(f"converting {photos} into {out} failed")
            complete.touch()
        data[fmt] = out
    return data


def measure(tree: Path, path_root: Path, kind: str, fmt: str, data: Path, args) -> float:
    """Median images/s of one process's timed epochs."""
    done = subprocess.run([sys.executable, str(EPOCHS_SCRIPT), kind, fmt, str(data), "--batch", str(args.batch),
                           "--workers", str(args.workers), "--epochs", str(args.epochs)],
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(path_root)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {kind} {fmt} loader of {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["ddmim"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the run in {tree} imported {result['ddmim']}, from another tree")
    return statistics.median(result["images_per_s"])


def ratio(rates: dict[str, list[float]], top: str, bottom: str) -> dict:
    per_round = [a / b for a, b in zip(rates[top], rates[bottom])]
    return {"ratio": statistics.median(rates[top]) / statistics.median(rates[bottom]),
            "median_round_ratio": statistics.median(per_round), "round_min": min(per_round),
            "round_max": max(per_round)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", choices=("folder", "ffcv", "dali"), default=["folder", "ffcv", "dali"])
    parser.add_argument("--resolution", type=int, default=256, help="--max-resolution of the conversions")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per process, after an untimed one")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--base", help="an earlier commit whose ddmim loaders are timed too")
    parser.add_argument("--guard", type=float, help="exit 1 when a ddmim loader is below this ratio to its plain one")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    data = prepare(args.images, args.resolution, args.workers)
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            trees = two_trees(args.base, Path(tmp))
        else:
            trees = {"this tree": (ROOT, import_root(ROOT, Path(tmp) / "head-imports"))}
        contenders = {"ddmim": (*trees["this tree"], "ddmim"), "plain": (*trees["this tree"], "plain")}
        if args.base:
            contenders["base"] = (*trees["base"], "ddmim")
        for fmt in args.formats:
            rates: dict[str, list[float]] = {name: [] for name in contenders}
            for round_ in range(args.rounds):
                names = list(contenders)
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                    tree, path_root, kind = contenders[name]
                    rates[name].append(measure(tree, path_root, kind, fmt, data[fmt], args))
            row = {"format": fmt, "images_per_s": {name: statistics.median(r) for name, r in rates.items()},
                   "x_plain": ratio(rates, "ddmim", "plain"), "rounds": rates}
            if args.base:
                row["x_base"] = ratio(rates, "ddmim", "base")
            rows.append(row)
            line = ", ".join(f"{name} {rate:.0f}" for name, rate in row["images_per_s"].items())
            print(f"{fmt}: images/s {line}; ddmim x plain {describe(row['x_plain'])}"
                  + (f"; ddmim x base {describe(row['x_base'])}" if args.base else ""), flush=True)
    payload = {"device": "cpu", "base": args.base, "this_tree": head.stdout.strip(), "images": args.images,
               "max_resolution": args.resolution, "batch": args.batch, "workers": args.workers,
               "epochs": args.epochs, "rounds": args.rounds, "rows": rows}
    print(f"wrote {write_results('loader-compare', payload, Path(args.json) if args.json else None)}")
    if args.guard is not None:
        slow = [r for r in rows if r["x_plain"]["median_round_ratio"] < args.guard]
        for r in slow:
            print(f"guard: ddmim's {r['format']} loader runs at {r['x_plain']['median_round_ratio']:.2f}x its plain "
                  f"library (median of round ratios), below {args.guard}x", file=sys.stderr)
        return 1 if slow else 0
    return 0


def describe(r: dict) -> str:
    return (f"{r['ratio']:.2f}x (median of round ratios {r['median_round_ratio']:.2f}x, rounds "
            f"{r['round_min']:.2f}-{r['round_max']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
