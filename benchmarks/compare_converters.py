"""Conversion time of this tree's converters against an earlier commit's, in one run.

    python benchmarks/compare_converters.py --base b730c90 [--rounds 3] [--max-resolution 256] [--workers 2]
        [--converters to_ffcv to_dali] [--json PATH]

Both trees convert the same 2,000 photographs (data_prep/photo_sample.py, as benchmarks/bench_loaders.py)
with data_prep/to_ffcv.py and data_prep/to_dali.py, train split, --workers 2 (or --workers). Each conversion
is a fresh process that imports one tree's packages only (as benchmarks/compare_commits.py), timed from start to exit,
both as wall time and as CPU time (user + system of the process and every worker it reaped: on a small shared
machine wall time swings by 10-15% between rounds, while the work done varies far less). The rounds alternate
the trees, the order flipped each round; the figures are medians over rounds, and the ratio both as this
tree's median over the base's and as the median of the per-round ratios (the two runs of a round are
neighbours in time, so slow phases of the machine cancel). Writes
benchmarks/results/converter-compare-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import write_results
from benchmarks.compare_commits import ROOT, two_trees
from data_prep.photo_sample import build_photo_dataset

CACHE = Path.home() / ".cache" / "ddmim" / "bench"


def cpu_seconds_of_children() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def convert(tree: Path, path_root: Path, script: str, photos: Path, out: Path, resolution: int,
            workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one conversion."""
    shutil.rmtree(out, ignore_errors=True)
    cpu = cpu_seconds_of_children()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(tree / "data_prep" / f"{script}.py"), str(photos), str(out),
                           "--workers", str(workers), "--splits", "train", "--max-resolution", str(resolution)],
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(path_root)},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{script} in {tree} failed:\n{done.stderr[-3000:]}")
    return seconds, cpu_seconds_of_children() - cpu


def compare(times: dict[str, list[float]]) -> dict:
    base, head = times["base"], times["this tree"]
    return {"base_s": statistics.median(base), "this_tree_s": statistics.median(head),
            "ratio": statistics.median(head) / statistics.median(base),
            "median_round_ratio": statistics.median(h / b for h, b in zip(head, base))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--converters", nargs="+", choices=("to_ffcv", "to_dali"), default=["to_ffcv", "to_dali"])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    photos = build_photo_dataset(CACHE / "photos-2000")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = two_trees(args.base, Path(tmp))
        for script in args.converters:
            wall = {name: [] for name in trees}
            cpu = {name: [] for name in trees}
            for round_ in range(args.rounds):
                for name in list(trees) if round_ % 2 == 0 else list(trees)[::-1]:
                    tree, path_root = trees[name]
                    seconds, cpu_s = convert(tree, path_root, script, photos, Path(tmp) / "out",
                                           args.max_resolution, args.workers)
                    wall[name].append(seconds)
                    cpu[name].append(cpu_s)
            row = {"converter": script, "wall": compare(wall), "cpu": compare(cpu),
                   "rounds": {"wall": wall, "cpu": cpu}}
            rows.append(row)
            for kind in ("wall", "cpu"):
                got = row[kind]
                print(f"{script} {kind}: base {got['base_s']:.2f} s, this tree {got['this_tree_s']:.2f} s: "
                      f"{got['ratio']:.3f}x (median of round ratios {got['median_round_ratio']:.3f}x)", flush=True)
    payload = {"device": "cpu", "base": args.base, "this_tree": head.stdout.strip(), "images": 2000,
               "max_resolution": args.max_resolution, "workers": args.workers, "rows": rows}
    print(f"wrote {write_results('converter-compare', payload, Path(args.json) if args.json else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
