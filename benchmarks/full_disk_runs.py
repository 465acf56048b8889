"""Runs the converters many times against a full disk and says whether every run ended as it should: within the
time limit, exit code 2, one `error:` line, no traceback, nothing published.

    python benchmarks/full_disk_runs.py [--runs 100] [--converters to_dali to_ffcv] [--modes fsize tmpfs]

Two kinds of full disk: `fsize`, a file-size limit of 256 KiB (RLIMIT_FSIZE: writes past it fail with EFBIG),
and `tmpfs`, a 1 MiB tmpfs mounted as the destination (ENOSPC; needs root). Half of the runs (--hog-share) run
beside a CPU hog, one spinning process per core. Writes benchmarks/results/full-disk-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 256 * 1024


def noise_source(root: Path, count: int = 60, size: int = 200) -> Path:
    """JPEGs of noise (incompressible: 60 of them fill far more than the limits)."""
    from PIL import Image

    (root / "train" / "photo").mkdir(parents=True)
    for i in range(count):
        Image.effect_noise((size, size), 40 + i % 50).convert("RGB").save(root / "train" / "photo" / f"{i}.JPEG")
    return root


def _small_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def cpu_hog(on: bool):
    procs = [mp.get_context("fork").Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)] if on \
        else []
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.join()


@contextlib.contextmanager
def destination(mode: str, work: Path):
    dst = Path(tempfile.mkdtemp(dir=work))
    if mode == "tmpfs":
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dst)], capture_output=True)
        if done.returncode != 0:
            shutil.rmtree(dst)
            raise RuntimeError(f"cannot mount a tmpfs: {done.stderr.decode().strip() or 'mount failed'}")
    try:
        yield dst / "out"
    finally:
        if mode == "tmpfs":
            subprocess.run(["umount", "-l", str(dst)], capture_output=True)
        shutil.rmtree(dst, ignore_errors=True)


def one_run(converter: str, mode: str, src: Path, work: Path, limit_s: float, hog: bool) -> dict:
    """One conversion into a full disk: what it did and whether that is what it must do."""
    extra = ["--shard-size", "1000"] if converter == "to_dali" else []
    with destination(mode, work) as dst, cpu_hog(hog):
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(REPO / "data_prep" / f"{converter}.py"), str(src), str(dst),
                                 "--workers", "2", "--splits", "train", *extra], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=_small_files if mode == "fsize" else None)
        try:
            _, err = proc.communicate(timeout=limit_s)
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            hung = True
        seconds = time.monotonic() - start
        published = dst.exists() and any(p.name in ("train", "train.beton") for p in dst.iterdir())
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    last = lines[-1] if lines else ""
    good = (not hung and proc.returncode == 2 and last.startswith("error: writing into") and "Traceback" not in err
            and not published)
    return {"converter": converter, "mode": mode, "hog": hog, "seconds": round(seconds, 2), "hung": hung,
            "returncode": proc.returncode, "last_line": last[:200], "published": published, "ok": good}


def run_many(converter: str, mode: str, runs: int, hog_share: float, work: Path, limit_s: float = 60.0,
             src: Path | None = None) -> list[dict]:
    src = src or noise_source(Path(tempfile.mkdtemp(dir=work)) / "src")
    hogged = round(runs * hog_share)
    return [one_run(converter, mode, src, work, limit_s, hog=i < hogged) for i in range(runs)]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="runs per converter and mode")
    parser.add_argument("--converters", nargs="+", default=["to_dali", "to_ffcv"], choices=["to_dali", "to_ffcv"])
    parser.add_argument("--modes", nargs="+", default=["fsize", "tmpfs"], choices=["fsize", "tmpfs"])
    parser.add_argument("--hog-share", type=float, default=0.5)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a run may take")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = noise_source(work / "src")
        for converter in args.converters:
            for mode in args.modes:
                try:
                    runs = run_many(converter, mode, args.runs, args.hog_share, work, args.limit, src)
                except RuntimeError as exc:
                    summary.append({"converter": converter, "mode": mode, "skipped": str(exc)})
                    print(f"{converter} {mode}: not run ({exc})")
                    continue
                rows += runs
                seconds = sorted(r["seconds"] for r in runs)
                entry = {"converter": converter, "mode": mode, "runs": len(runs), "ok": sum(r["ok"] for r in runs),
                         "hung": sum(r["hung"] for r in runs), "median_s": seconds[len(seconds) // 2],
                         "max_s": seconds[-1], "hogged": sum(r["hog"] for r in runs)}
                summary.append(entry)
                print(f"{converter} {mode}: {entry['ok']}/{entry['runs']} ended as they must ({entry['hung']} hung), "
                      f"median {entry['median_s']:.2f} s, longest {entry['max_s']:.2f} s, {entry['hogged']} beside "
                      "a CPU hog")
                for r in runs:
                    if not r["ok"]:
                        print(f"  bad run: {r}")
    print(f"wrote {write_results('full-disk', {'summary': summary, 'runs': rows}, args.json)}")
    return 0 if all(e.get("ok") == e.get("runs") for e in summary if "runs" in e) else 1


if __name__ == "__main__":
    sys.exit(main())
