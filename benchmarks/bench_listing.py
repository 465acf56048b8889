"""How long listing a source takes, and the memory it holds, at the sizes users bring.

    python benchmarks/bench_listing.py --files 1281167 [--layout imagefolder|unlabeled] [--repeats 3] [--base REV]

Builds (once, under --work) a synthetic tree of empty .JPEG files: ImageNet's shape (1,000 class folders under
train/, 50 images a class under val/) or an unlabeled one (folders of 1,000 files, two levels deep). Each repeat
lists it in a fresh process with `ddmim.data.layout.source_splits`, the call every format's reader and both
converters make, and reports the seconds, the memory the listing holds (the process's resident size after the
call, less before it) and its peak (the largest resident size, less the size before), then the time the folder
loader takes to its first batch's samples (the sampler's first epoch; nothing is decoded). With --base the earlier
commit's listing (exported with `git archive`) runs too, alternating with this tree's, and the ratios are
printed. Each repeat starts with an empty listing cache (`ddmim.data.listing_cache`), then lists again with
the listing it kept ("second start"). The page cache holds the directories after the first repeat.
Writes benchmarks/results/listing-<device>.json, or --json.
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

CHILD = r"""
import json, sys, time
import ddmim
from ddmim.config import make_config
from ddmim.data.folder import ListedImages, train_loader
from ddmim.data.layout import source_splits
from ddmim.data.loader_spec import LoaderSpec

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

before = rss_mib()
start = time.perf_counter()
classes, train, val = source_splits(sys.argv[1], sys.argv[2], 0.01)
seconds = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss keeps the peak of the process that forked it, across exec)
def peak_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024

held, peak = rss_mib() - before, peak_mib() - before
start = time.perf_counter()  # the folder loader's first epoch, up to its first batch's samples (no decoding)
loader = train_loader(ListedImages(train.files, classes, None), LoaderSpec.of(make_config("tiny")))
next(iter(loader.batch_sampler))
print(json.dumps({"seconds": seconds, "held_mib": held, "peak_mib": peak,
                  "first_batch_s": time.perf_counter() - start, "first_batch_peak_mib": peak_mib() - before,
                  "train": len(train.files), "val": len(val.files), "classes": len(classes),
                  "ddmim": ddmim.__file__}))
"""


def build_tree(root: Path, files: int, layout: str) -> Path:
    """The tree, made once: a marker file says it is complete."""
    done = root.parent / f".{root.name}-complete"  # beside the tree: a change inside would unsettle its cache
    if done.exists():
        return root
    per_folder = 1000 if layout == "unlabeled" else -(-files // 1000)  # ImageNet: 1,000 classes
    for n in range(files):
        if layout == "imagefolder":
            folder = root / "train" / f"n{n // per_folder:08d}"
        else:
            folder = root / f"d{n // (per_folder * 100):04d}" / f"e{(n // per_folder) % 100:03d}"
        if n % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n:09d}.JPEG").touch()
    if layout == "imagefolder":
        for c in range(min(1000, files)):
            folder = root / "val" / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(50):
                (folder / f"v{c:04d}{k:02d}.JPEG").touch()
    done.touch()
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_281_167)
    parser.add_argument("--layout", choices=["imagefolder", "unlabeled"], default="imagefolder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ddmim-listing-bench")
    parser.add_argument("--base", help="an earlier commit whose listing is measured too, alternating with this tree's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    root = build_tree(args.work / f"{args.layout}-{args.files}", args.files, args.layout)
    with tempfile.TemporaryDirectory() as tmp:
        trees = (two_trees(args.base, Path(tmp)) if args.base else
                 {"this tree": (ROOT, import_root(ROOT, Path(tmp) / "imports"))})
        runs = {name: [] for name in [*trees, "second start"]}
        for repeat in range(args.repeats):
            for name, (tree, path_root) in trees.items():
                cache = Path(tmp) / f"cache-{name}-{repeat}"  # empty: the first start lists the tree
                starts = [name, "second start"] if name == "this tree" else [name]
                for start in starts:
                    done = subprocess.run([sys.executable, "-c", CHILD, str(root), args.layout],
                                          capture_output=True, text=True, cwd=tree, check=True,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(path_root),
                                               "XDG_CACHE_HOME": str(cache)})
                    runs[start].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    if not Path(runs[start][-1]["ddmim"]).resolve().is_relative_to(tree.resolve()):
                        raise SystemExit(f"the listing of {tree} imported {runs[start][-1]['ddmim']}, from another "
                                         "tree")
    row = {"layout": args.layout, "files": args.files, "base": args.base}
    for name, measured in runs.items():
        row[name] = {key: statistics.median(r[key] for r in measured)
                     for key in ("seconds", "held_mib", "peak_mib", "first_batch_s", "first_batch_peak_mib")}
        row[name]["runs"] = measured
        print(f"{name}: {args.layout}, {args.files:,} files: listed in {row[name]['seconds']:.1f} s (median of "
              f"{args.repeats}), {row[name]['held_mib']:.0f} MiB held, {row[name]['peak_mib']:.0f} MiB at the peak; "
              f"the folder loader's first batch {row[name]['first_batch_s']:.1f} s later, "
              f"{row[name]['first_batch_peak_mib']:.0f} MiB at the peak; train {measured[0]['train']:,}, "
              f"val {measured[0]['val']:,}, {measured[0]['classes']} classes")
    if args.base:
        print("this tree / base: " + ", ".join(f"{key} {row['this tree'][key] / row['base'][key]:.2f}x"
                                               for key in ("seconds", "held_mib", "peak_mib", "first_batch_s")))
    path = write_results(f"listing-{args.layout}-{args.files}", row, args.json)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
