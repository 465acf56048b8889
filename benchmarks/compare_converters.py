"""Conversion time of this tree's converters against an earlier commit's, in one run.

    python benchmarks/compare_converters.py --base b730c90 [--rounds 3] [--max-resolution 256] [--json PATH]

Both trees convert the same 2,000 photographs (data_prep/photo_sample.py, as benchmarks/bench_loaders.py)
with data_prep/to_ffcv.py and data_prep/to_dali.py, train split, --workers 2. Each conversion is a fresh
process that imports one tree's packages only (as benchmarks/compare_commits.py), timed from start to exit;
the rounds alternate the trees, the order flipped each round; the figures are medians over rounds, the ratio
this tree's median over the base's. Writes benchmarks/results/converter-compare-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddmim_benchmarks.common import write_results
from ddmim_benchmarks.compare_commits import ROOT, two_trees
from ddmim_data_prep.photo_sample import build_photo_dataset

CACHE = Path.home() / ".cache" / "ddmim" / "bench"


def convert(tree: Path, path_root: Path, script: str, photos: Path, out: Path, resolution: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(tree / "data_prep" / f"{script}.py"), str(photos), str(out),
                           "--workers", "2", "--splits", "train", "--max-resolution", str(resolution)],
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(path_root)},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{script} in {tree} failed:\n{done.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-resolution", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    photos = build_photo_dataset(CACHE / "photos-2000")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = two_trees(args.base, Path(tmp))
        for script in ("to_ffcv", "to_dali"):
            times = {name: [] for name in trees}
            for round_ in range(args.rounds):
                for name in list(trees) if round_ % 2 == 0 else list(trees)[::-1]:
                    tree, path_root = trees[name]
                    times[name].append(convert(tree, path_root, script, photos, Path(tmp) / "out",
                                               args.max_resolution))
            base_s, head_s = statistics.median(times["base"]), statistics.median(times["this tree"])
            rows.append({"converter": script, "base_s": base_s, "this_tree_s": head_s, "ratio": head_s / base_s,
                         "rounds": times})
            print(f"{script}: base {base_s:.1f} s, this tree {head_s:.1f} s: {head_s / base_s:.3f}x", flush=True)
    payload = {"device": "cpu", "base": args.base, "this_tree": head.stdout.strip(), "images": 2000,
               "max_resolution": args.max_resolution, "rows": rows}
    print(f"wrote {write_results('converter-compare', payload, Path(args.json) if args.json else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
