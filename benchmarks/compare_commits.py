"""Step time of this tree against an earlier commit, in one run: a guard against slowing the CPU path.

    python benchmarks/compare_commits.py --base b730c90 [--presets seed tiny] [--rounds 3] [--json PATH]

The base commit is exported (`git archive`) to a temporary folder. Each measurement is a fresh process that
imports one tree's packages only (checked: the module files it loaded are printed with its figures) and runs
`ddmim train`'s Trainer on one synthetic batch already on the device: --warmup steps, then --steps timed steps,
from the start of one training batch to the start of the next (the step, backward, optimiser, callbacks). The
rounds alternate the trees, the order flipped each round; the figures are medians over rounds, and the ratio
is this tree's median over the base's. Writes benchmarks/results/commit-compare-<device>.json, or --json.
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

ROOT = Path(__file__).resolve().parent.parent
# import name -> folder; commits before the scripts ran from the checkout imported data_prep as ddmim_data_prep
PACKAGES = {"ddmim": "ddmim", "ddmim_kernels": "kernels", "data_prep": "data_prep", "ddmim_data_prep": "data_prep"}
CPU_BATCH = {"seed": 8}  # a 224 px preset at its own batch takes minutes per step on a CPU

CHILD = r"""
import json, statistics, sys, tempfile, time
from pathlib import Path
import pytorch_lightning as pl
import torch
import ddmim, ddmim_kernels
from ddmim.config import config_from_dict, preset_values, with_overrides
from ddmim.train.launch import Launch, resolve_launch
from ddmim.train.pretrain_module import DDMIMModule
from ddmim.train.speed_test import OnDevice
from ddmim.train.trainer import build_trainer

preset, batch, warmup, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

class Clock(pl.Callback):
    def __init__(self):
        self.starts = []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

torch.manual_seed(0)
values = with_overrides(preset_values(preset), typed={"train.batch_size": batch, "data.num_workers": 0})
cfg = config_from_dict(values)
launch = resolve_launch(Launch(max_steps=warmup + steps + 1, progress_bar=False))
module = DDMIMModule(cfg.to_dict(), cuda=launch.accelerator == "gpu")
clock = Clock()
with tempfile.TemporaryDirectory() as tmp:
    run = build_trainer(Path(tmp), cfg, launch)
    run.trainer.callbacks.append(clock)
    size = cfg.model.img_size
    batch_data = (torch.randn(batch, 3, size, size), torch.zeros(batch, dtype=torch.long))
    run.trainer.fit(module, train_dataloaders=OnDevice(batch_data, warmup + steps + 1))
gaps = [b - a for a, b in zip(clock.starts, clock.starts[1:])][warmup:]
print(json.dumps({"step_s": statistics.median(gaps), "steps": len(gaps),
                  "modules": [ddmim.__file__, ddmim_kernels.__file__]}))
"""


def import_root(tree: Path, folder: Path) -> Path:
    """A folder from which the tree's packages import under the names its code uses, and nothing else of ours."""
    folder.mkdir(parents=True)
    for name, source in PACKAGES.items():
        if (tree / source).is_dir():
            (folder / name).symlink_to(tree / source)
    return folder


def two_trees(base: str, tmp: Path) -> dict[str, tuple[Path, Path]]:
    """{'base': commit `base` exported under `tmp`, 'this tree': this checkout}, each with its import root."""
    base_tree = tmp / "base"
    base_tree.mkdir()
    archive = subprocess.run(f"git archive {base} | tar -x -C {base_tree}", shell=True, cwd=ROOT,
                             capture_output=True, text=True)
    if archive.returncode != 0:
        raise SystemExit(f"cannot export commit {base}: {archive.stderr.strip()}")
    return {"base": (base_tree, import_root(base_tree, tmp / "base-imports")),
            "this tree": (ROOT, import_root(ROOT, tmp / "head-imports"))}


def measure(tree: Path, path_root: Path, preset: str, batch: int, warmup: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path_root)}
    done = subprocess.run([sys.executable, "-c", CHILD, preset, str(batch), str(warmup), str(steps)], env=env,
                          cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"a step-time run of {preset} in {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for module in result["modules"]:
        if not Path(module).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"the run in {tree} imported {module}, from another tree")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--presets", nargs="+", default=["seed", "tiny"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        trees = two_trees(args.base, Path(tmp))
        rows = []
        for preset in args.presets:
            from ddmim.config import make_config

            batch = CPU_BATCH.get(preset, make_config(preset).train.batch_size)
            times = {name: [] for name in trees}
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
                for name in order:
                    tree, path_root = trees[name]
                    times[name].append(measure(tree, path_root, preset, batch, args.warmup, args.steps)["step_s"])
            base_s, head_s = statistics.median(times["base"]), statistics.median(times["this tree"])
            rows.append({"preset": preset, "batch": batch, "base_step_s": base_s, "this_tree_step_s": head_s,
                         "ratio": head_s / base_s, "rounds": times})
            print(f"{preset} (batch {batch}): base {base_s * 1000:.0f} ms/step, this tree {head_s * 1000:.0f} "
                  f"ms/step: {head_s / base_s:.2f}x", flush=True)
    payload = {"device": "cpu", "base": args.base, "this_tree": head.stdout.strip(), "steps": args.steps,
               "warmup": args.warmup, "rows": rows}
    print(f"wrote {write_results('commit-compare', payload, Path(args.json) if args.json else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
