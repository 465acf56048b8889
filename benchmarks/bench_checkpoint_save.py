"""What one periodic checkpoint save costs for a preset's model: last.ckpt written as a second copy of the step
checkpoint (Lightning's `save_last=True`, ddmim before) against last.ckpt as a symlink to it (ddmim now).

    python benchmarks/bench_checkpoint_save.py [--preset seed] [--rounds 3] [--dir PATH] [--json PATH]

The checkpoint holds what a training one holds: the preset's pretraining model (student, EMA teacher, heads)
and its AdamW moments. Each round saves it both ways through ddmim's checkpoint writer (digest, torch.save,
fsync, rename), the order alternating; the figures are medians over the rounds, and the ratio is from this run.
`--dir` is where the files are written (default: a temporary folder; give one on the disk the runs use).
Writes benchmarks/results/checkpoint-save-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import write_results  # noqa: E402
from ddmim.atomic import point_at  # noqa: E402
from ddmim.config import make_config  # noqa: E402
from ddmim.models.factory import pretraining_model  # noqa: E402
from ddmim.train.checkpoint_files import LAST, AtomicCheckpointIO  # noqa: E402


def training_checkpoint(preset: str) -> dict:
    model = pretraining_model(make_config(preset))
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the moments a checkpoint carries
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1}


def save_both_ways(checkpoint: dict, folder: Path, rounds: int) -> dict[str, list[float]]:
    writer = AtomicCheckpointIO(keep=1)
    step, last = folder / "step00000001.ckpt", folder / LAST

    def copy() -> None:
        writer.save_checkpoint(dict(checkpoint), step)
        writer.save_checkpoint(dict(checkpoint), last)

    def link() -> None:
        writer.save_checkpoint(dict(checkpoint), step)
        point_at(last, step)

    times: dict[str, list[float]] = {"copy": [], "link": []}
    for n in range(rounds):
        for name, save in (("copy", copy), ("link", link))[:: 1 if n % 2 == 0 else -1]:
            for old in folder.iterdir():
                old.unlink()
            start = time.perf_counter()
            save()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    checkpoint = training_checkpoint(args.preset)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        times = save_both_ways(checkpoint, Path(tmp), args.rounds)
        size = (Path(tmp) / "step00000001.ckpt").stat().st_size
    copy, link = statistics.median(times["copy"]), statistics.median(times["link"])
    result = {"preset": args.preset, "checkpoint_mib": round(size / 2**20, 1), "rounds": args.rounds,
              "copy_s": round(copy, 3), "link_s": round(link, 3), "speedup": round(copy / link, 2),
              "all_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()}}
    print(f"{args.preset}: a {result['checkpoint_mib']} MiB checkpoint; a save with last.ckpt copied "
          f"{copy:.2f} s, linked {link:.2f} s: {copy / link:.2f}x (medians of {args.rounds} rounds)")
    print(f"wrote {write_results('checkpoint-save', result, args.json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
