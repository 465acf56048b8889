"""The GPU suite's steps, run one by one with their own time limits; `benchmarks/gpu_suite.sh` starts this.

    python benchmarks/gpu_suite.py OUT [--dry-run] [--budget SECONDS] [--work DIR]

Each step runs in its own process, writes its JSON under OUT and its output to OUT/logs/<step>.log. A step that
cannot run on this machine (no FFCV, no DALI) is `not run` with its reason; so is one that the time budget has
no room for. The exit status is 0 when every step that ran passed. OUT/summary.json and OUT/summary.md say
what ran, how long it took and what it measured.

--dry-run rehearses every step on the CPU with the tiny presets, one batch size and a few steps: kernels in
Triton's interpreter (the kernel tests of the model's dispatch only), torch.compile with the aot_eager backend
(dynamo and AOTAutograd trace forward and backward as on the GPU; inductor's code generation is the one part
left out, as it takes minutes on a CPU), and torch_kernels as the "best variant" of the later steps, so that
they do not compile again. Its step limits are five times the GPU's: on a CPU of unknown speed and load they
only guard against a hang.

The real run's budget is 420 s by default; give the command a limit of its own at least 90 s above it. Steps
run in order of value: the kernel tests, the kernel and attention benchmarks, the eager ceilings, end to end,
the profile, then the compiled variants (at one batch size: a compile takes about a minute), SimMIM/MAE and
fine-tuning. A step starts only when the time left covers its estimate (`suite_costs.py` states the cost model
and prints the plan for an H100 and an H200); a step cut by the budget is "not finished" and keeps the rows it
wrote. OUT/summary.json and summary.md are rewritten after every step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.suite_costs import BUDGET_S, PEAK_BF16, Cost, describe, plan, timed_images
from ddmim.atomic import write_text

# the uncompiled variants share one process (one start-up); each compiled one has its own, and its own limit
SEED_STEPS = {"seed-eager": ("eager", "channels_last", "torch_kernels", "timm_attention"),
              "seed-compile_fused": ("compile_fused",),
              "seed-compile": ("compile",)}
NO_DALI = "NVIDIA DALI is not installed on this GPU machine; the DALI steps run only where it is"

MODES = {
    False: {  # a GPU
        "presets": {"seed": "seed", "simmim": "simmim", "mae": "mae_vit_s16", "finetune": "seed"},
        "batches": ["128", "256"],  # SEED_BATCHES "timing": ["--warmup", "3", "--repeats", "5", "--steps", "4"],
        "backend": "inductor", "photos": ("2000", "100"), "workers": "16", "e2e_steps": "30", "e2e_batch": "128",
        "kernel_tests": ["tests/test_kernel_masked_loss.py", "tests/test_kernel_masks.py",
                         "tests/test_kernel_dispatch.py"],
        "bench_kernels": ["--batch", "128"], "profile": ["--batch", "128"], "lightning": ["--batch", "128"],
        "attention": ["--batch", "128", "--dtype", "bf16"],
        "budget": BUDGET_S, "best": None, "limit_scale": 1,
    },
    True: {  # the CPU rehearsal
        "presets": {"seed": "tiny", "simmim": "tiny_simmim", "mae": "tiny_mae", "finetune": "tiny"},
        "batches": ["8"], "timing": ["--warmup", "1", "--repeats", "2", "--steps", "1"],
        "backend": "aot_eager", "photos": ("48", "16"), "workers": "2", "e2e_steps": "3", "e2e_batch": "8",
        "kernel_tests": ["tests/test_kernel_dispatch.py"],
        "bench_kernels": ["--batch", "2", "--size", "32", "--dtypes", "fp32"],
        "attention": ["--batch", "1", "--dtype", "fp32", "--repeats", "3"],
        "profile": ["--batch", "8", "--steps", "2", "--profile-steps", "1", "--warmup", "1"],
        "lightning": ["--batch", "8", "--steps", "3", "--warmup", "1", "--rounds", "1"],
        # the steps that take the best variant would compile again on the CPU, where it is the slow part
        "budget": 0, "best": "torch_kernels",
        # the limits are sized for a Hopper GPU; on a CPU of unknown speed and load they only guard against a hang
        "limit_scale": 5,
    },
}


@dataclass
class Suite:
    out: Path
    work: Path
    dry_run: bool
    python: str
    env: dict[str, str]
    ffcv_env: dict[str, str]
    mode: dict
    probe: dict = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)

    def json(self, name: str) -> Path:
        return self.out / f"{name}.json"

    def best_variant(self, compiled: bool = True) -> str:
        """The seed variant with the most images/s at the first batch size (eager if none ran)."""
        if self.mode["best"]:
            return self.mode["best"]
        first = self.mode["batches"][0]
        rates = {row["variant"]: row["images_per_s"] for step in SEED_STEPS
                 for row in self.results.get(step, {}).get("rows", [])
                 if "error" not in row and str(row["batch"]) == first and (compiled or row["compile"] == "off")}
        return max(rates, key=rates.get) if rates else "eager"

    def variant_flags(self, variant: str) -> list[str]:
        """`ddmim train` options of a variant (benchmarks/train_steps.py)."""
        flags = {"eager": ["--kernels", "auto"], "channels_last": ["--kernels", "auto", "--channels-last"],
                 "torch_kernels": ["--kernels", "torch"],
                 "timm_attention": ["--kernels", "auto", "--set", "model.fused_attention=false"]}
        return flags[variant]


@dataclass
class Step:
    name: str
    commands: Callable[[Suite, str], list[list[str]]]  # given the suite and the step's name
    cost: Cost  # what it is expected to take on an H100 or H200 (suite_costs)
    limit_s: int
    needs: str = ""  # ffcv | dali
    moved_json: Callable[[Suite], Path] | None = None  # a file a command writes, moved to OUT/<name>.json
    finish: Callable[[Suite, "Step"], None] | None = None


def py(s: Suite, *args: str) -> list[str]:
    return [s.python, *args]


def train_bench(keys: tuple[str, ...], variant_of: Callable[[Suite], list[str]], finetune: bool = False,
                first_batch: bool = False):
    def commands(s: Suite, name: str) -> list[list[str]]:
        m = s.mode
        return [py(s, "benchmarks/bench_train.py", "--presets", *(m["presets"][k] for k in keys),
                   "--variants", *variant_of(s), "--batches", *(m["batches"][:1] if first_batch else m["batches"]),
                   *m["timing"], "--compile-backend", m["backend"],
                   *(["--finetune"] if finetune else []), "--json", str(s.json(name)))]
    return commands


def kernel_tests(s: Suite, name: str) -> list[list[str]]:
    return [py(s, "-m", "pytest", "-q", "-p", "no:cacheprovider", *s.mode["kernel_tests"],
               f"--junitxml={s.work / 'kernel-tests.xml'}")]


def junit_to_json(s: Suite, step: Step) -> None:
    path = s.work / "kernel-tests.xml"
    if not path.exists():
        return
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    write_text(s.json(step.name), json.dumps({
        "tests": int(suite.get("tests", 0)), "failures": int(suite.get("failures", 0)),
        "errors": int(suite.get("errors", 0)), "skipped": int(suite.get("skipped", 0)),
        "seconds": float(suite.get("time", 0)), "interpreter": s.env.get("TRITON_INTERPRET") == "1",
        "device": s.probe.get("device"), "files": s.mode["kernel_tests"], "failed": failed}, indent=2))


def photos(s: Suite) -> list[str]:
    train, val = s.mode["photos"]
    return py(s, "data_prep/photo_sample.py", str(s.work / "photos"), "--train", train, "--val", val)


def benchmark_run(s: Suite, data: Path, name: str) -> list[str]:
    m = s.mode
    return py(s, "-m", "ddmim", "train", "--preset", m["presets"]["seed"], "--data", str(data), "--benchmark",
              m["e2e_steps"], "--batch-size", m["e2e_batch"], "--workers", m["workers"], "--no-progress",
              *s.variant_flags(s.best_variant(compiled=False)), "--out", str(s.work / name))


def benchmark_json(name: str) -> Callable[[Suite], Path]:
    def path(s: Suite) -> Path:
        found = sorted((s.work / name).glob("train-benchmark-*.json"))
        return found[0] if found else s.work / name / "train-benchmark.json"
    return path


def converted_e2e(fmt: str):
    """The photographs converted at the README's recommended 256 px, then `ddmim train --benchmark` on them."""
    def commands(s: Suite, name: str) -> list[list[str]]:
        return [photos(s), py(s, f"data_prep/to_{fmt}.py", str(s.work / "photos"), str(s.work / fmt),
                              "--max-resolution", "256", "--workers", s.mode["workers"], "--overwrite"),
                benchmark_run(s, s.work / fmt, name)]
    return commands


def best(s: Suite) -> list[str]:
    return [s.best_variant()]


SEED_BATCHES = [128, 256]
STEPS = [
    Step("kernel-tests", kernel_tests, Cost(fixed_s=30), 120, finish=junit_to_json),
    Step("bench-kernels", lambda s, name: [py(s, "benchmarks/bench_kernels.py", *s.mode["bench_kernels"],
                                              "--compile-backend", s.mode["backend"], "--json", str(s.json(name)))],
         Cost(fixed_s=50), 150),
    Step("bench-attention", lambda s, name: [py(s, "benchmarks/bench_attention.py", *s.mode["attention"],
                                                "--json", str(s.json(name)))], Cost(fixed_s=10), 90),
    Step("seed-eager", train_bench(("seed",), lambda s: list(SEED_STEPS["seed-eager"])),
         Cost(images=timed_images(4, SEED_BATCHES), fixed_s=5), 90),
    Step("e2e-folder", lambda s, name: [photos(s), benchmark_run(s, s.work / "photos", name)],
         Cost(starts=2, images=30 * 128, fixed_s=25), 120, moved_json=benchmark_json("e2e-folder")),
    Step("e2e-ffcv", converted_e2e("ffcv"), Cost(starts=3, images=30 * 128, fixed_s=20), 150, needs="ffcv",
         moved_json=benchmark_json("e2e-ffcv")),
    Step("e2e-dali", converted_e2e("dali"), Cost(starts=3, images=30 * 128, fixed_s=20), 150, needs="dali",
         moved_json=benchmark_json("e2e-dali")),
    Step("profile", lambda s, name: [py(s, "benchmarks/profile_step.py", "--preset", s.mode["presets"]["seed"],
                                        "--variant", s.best_variant(), *s.mode["profile"], "--compile-backend",
                                        s.mode["backend"], "--json", str(s.json(name)))],
         Cost(images=10 * 128, fixed_s=20), 120),
    Step("lightning-overhead", lambda s, name: [py(s, "benchmarks/bench_lightning.py", "--preset",
                                                   s.mode["presets"]["seed"], "--variant", s.best_variant(),
                                                   *s.mode["lightning"], "--compile-backend", s.mode["backend"],
                                                   "--json", str(s.json(name)))],
         Cost(images=60 * 128, fixed_s=30), 150),
    # compiled, at the first batch size only: a compile per batch size would double the longest steps
    *[Step(name, train_bench(("seed",), lambda s, v=variants: list(v), first_batch=True),
           Cost(compiles=1, images=timed_images(1, SEED_BATCHES[:1]), fixed_s=5), 240)
      for name, variants in SEED_STEPS.items() if name != "seed-eager"],
    Step("simmim-mae-best", train_bench(("simmim", "mae"), best, first_batch=True),
         Cost(compiles=2, images=timed_images(2, SEED_BATCHES[:1]), fixed_s=5), 300),
    Step("finetune", train_bench(("finetune",), lambda s: ["eager"], finetune=True),
         Cost(images=timed_images(1, SEED_BATCHES) * 3 // 5, fixed_s=5), 120),
]


def availability(s: Suite, needs: str) -> str:
    """'' when the step's library imports here, else why it does not."""
    if not needs:
        return ""
    status = s.probe.get(needs, "not probed")
    if status == "ok":
        return ""
    if needs == "dali":
        return NO_DALI if not s.dry_run else f"NVIDIA DALI does not import here ({status})"
    hint = "" if s.dry_run else " (pack it with bash benchmarks/pack_ffcv_for_gpu.sh and copy .ffcv-gpu along)"
    return f"FFCV does not import here: {status}{hint}"


def run_commands(s: Suite, step: Step, timeout: float) -> tuple[str, str]:
    """(status, reason) of running the step's commands one after another into its log."""
    log_path = s.out / "logs" / f"{step.name}.log"
    env = s.ffcv_env if step.needs == "ffcv" else s.env
    deadline = time.monotonic() + timeout
    with open(log_path, "w") as log:
        for command in step.commands(s, step.name):
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "timed out", f"stopped after {timeout:.0f} s"
            if rc != 0:
                return "failed", f"exit code {rc}: {last_line(log_path)}"
    return "ok", ""


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_step(s: Suite, step: Step, started: float) -> dict:
    limit = step.limit_s * s.mode["limit_scale"]
    entry = {"name": step.name, "status": "not run", "reason": "", "seconds": 0.0, "json": None,
             "estimate_s": round(step.cost.seconds(), 1), "limit_s": limit}
    reason = availability(s, step.needs)
    budget = s.mode["budget"]
    left = budget - (time.monotonic() - started) if budget else limit
    if not reason and left < entry["estimate_s"]:
        reason = f"the suite's {budget} s budget had {left:.0f} s left, less than this step's estimate of " \
                 f"{entry['estimate_s']} s"
    if reason:
        entry["reason"] = reason
        return entry
    t0 = time.monotonic()
    status, reason = run_commands(s, step, min(limit, left))
    entry["seconds"] = round(time.monotonic() - t0, 1)
    if status == "timed out":  # by the suite's budget: not finished, with the rows it wrote; by its own limit: failed
        status = "not finished" if left < limit else "failed"
        reason = f"{reason}, the suite's budget" if left < limit else f"{reason}, its own limit"
    if step.moved_json is not None:
        produced = step.moved_json(s)
        if produced.exists():
            shutil.move(str(produced), s.json(step.name))
    if step.finish is not None:
        step.finish(s, step)
    path = s.json(step.name)
    if path.exists():
        entry["json"] = path.name
        s.results[step.name] = json.loads(path.read_text())
        entry["headline"] = headline(step.name, s.results[step.name])
    elif status == "ok":
        status, reason = "failed", f"wrote no {path.name}"
    entry.update(status=status, reason=reason)
    return entry


def headline(name: str, r: dict) -> str:
    """One line of what a step measured, for the table."""
    if name == "kernel-tests":
        return f"{r['tests'] - r['failures'] - r['errors'] - r['skipped']} passed, {r['failures'] + r['errors']} " \
               f"failed, {r['skipped']} skipped ({'interpreter' if r['interpreter'] else 'no interpreter'})"
    if name == "bench-kernels":
        return "; ".join(f"{row['case']} {row['dtype']}: {row['speedup_vs_eager']:.2f}x eager, "
                         f"{row['speedup_vs_compile']:.2f}x compile" for row in r["loss_rows"][:1])
    if name == "bench-attention":
        return f"fused window attention {r['total_speedup']:.2f}x the speed of timm's " \
               f"({r['dtype']}, batch {r['batch']})"
    if "rows" in r:
        parts = []
        for row in r["rows"]:
            if "error" in row:
                parts.append(f"b{row['batch']} FAILED")
                continue
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else ""
            compiled = f", compile {row['compile']}" if row["compile"] != "off" else ""
            parts.append(f"{row['preset']} {row['variant']} b{row['batch']} {row['images_per_s']:.0f} img/s{mfu}"
                         f"{compiled}")
        return ", ".join(parts)
    if name == "profile":
        return f"{r['variant']}: {100 * r['outside_model_share']:.1f}% of the step outside the model; top: " \
               f"{r['top'][0]['name'][:60] if r['top'] else '-'}"
    if name == "lightning-overhead":
        return f"{r['variant']}: plain {r['plain_step_ms']:.2f} ms, Lightning {r['lightning_step_ms']:.2f} ms " \
               f"({100 * r['overhead_share']:+.1f}%)"
    if "end_to_end_images_per_s" in r:
        return f"end to end {r['end_to_end_images_per_s']:.0f} img/s, data wait " \
               f"{100 * r['loader_stall_share']:.1f}%, loader alone {r['loader_images_per_s']:.0f} img/s"
    return ""


PROBE = """
import importlib, json, os, sys
import torch
info = {"python": sys.version.split()[0], "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {}, "imported_from": {}}
for name in ("torch", "triton", "timm", "pytorch_lightning", "torchvision", "numpy"):
    try:
        info["versions"][name] = importlib.import_module(name).__version__
    except Exception as exc:
        info["versions"][name] = f"missing ({type(exc).__name__})"
for name in ("ddmim", "ddmim_kernels", "data_prep", "benchmarks"):
    info["imported_from"][name] = os.path.dirname(importlib.import_module(name).__file__)
for key, module in (("ffcv", "ffcv"), ("dali", "nvidia.dali")):
    try:
        importlib.import_module(module)
        info[key] = "ok"
    except Exception as exc:
        info[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
print(json.dumps(info))
"""


def probe(s: Suite) -> dict:
    base = subprocess.run([s.python, "-c", PROBE], env=s.env, capture_output=True, text=True, timeout=120)
    if base.returncode != 0:
        raise SystemExit(f"gpu_suite: the project does not import here:\n{base.stderr.strip()[-2000:]}")
    info = json.loads(base.stdout.strip().splitlines()[-1])
    if s.ffcv_env is not s.env:  # a packed FFCV: its libraries are found only by the FFCV steps
        packed = subprocess.run([s.python, "-c", PROBE], env=s.ffcv_env, capture_output=True, text=True, timeout=120)
        info["ffcv"] = json.loads(packed.stdout.strip().splitlines()[-1])["ffcv"] if packed.returncode == 0 \
            else f"the packed FFCV does not import: {packed.stderr.strip().splitlines()[-1][:200]}"
    return info


def write_summary(s: Suite, steps: list[dict], seconds: float) -> None:
    summary = {"device": s.probe.get("device"), "dry_run": s.dry_run, "python": s.probe.get("python"),
               "versions": s.probe.get("versions", {}), "imported_from": s.probe.get("imported_from", {}),
               "budget_s": s.mode["budget"] or None, "seconds": round(seconds, 1), "steps": steps}
    write_text(s.out / "summary.json", json.dumps(summary, indent=2))
    lines = [f"# GPU suite{' (CPU rehearsal)' if s.dry_run else ''}: {summary['device']}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
             f"Total {seconds:.0f} s" + (f" of a {s.mode['budget']} s budget" if s.mode["budget"] else ""), "",
             "| step | status | s | what it measured, or why not | JSON |", "|---|---|---|---|---|"]
    for e in steps:
        what = e.get("headline") or e["reason"]
        if e["status"] == "failed" and e["reason"]:
            what = f"{e['reason']}" + (f" ({e['headline']})" if e.get("headline") else "")
        lines.append(f"| {e['name']} | {e['status']} | {e['seconds']:.0f} | {what.replace('|', '/')} | "
                     f"{e['json'] or '-'} |")
    write_text(s.out / "summary.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: tiny presets, few steps")
    parser.add_argument("--budget", type=int, help="seconds for all steps (default 420 on a GPU; none dry)")
    parser.add_argument("--work", type=Path, help="folder for generated data (default: a temporary folder)")
    parser.add_argument("--only", nargs="+", help="run these steps only")
    parser.add_argument("--plan", action="store_true", help="print which steps the budget has room for on an H100 "
                        "and an H200 (suite_costs' estimates), and run nothing")
    parser.add_argument("--without", nargs="*", default=["ffcv", "dali"], choices=["ffcv", "dali"],
                        help="with --plan: libraries the GPU machine lacks (default: both)")
    args = parser.parse_args(argv)
    if args.plan:
        budget = args.budget or BUDGET_S
        for gpu in PEAK_BF16:
            print(describe(plan(STEPS, budget, gpu, tuple(args.without)), budget, gpu, tuple(args.without)))
        return 0
    if args.out is None:
        parser.error("OUT is required, unless --plan")

    mode = dict(MODES[args.dry_run])
    if args.budget is not None:
        mode["budget"] = args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="ddmim-gpu-suite-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
    ffcv_env = env
    if os.environ.get("DDMIM_FFCV_LIB"):  # set by gpu_suite.sh when a packed FFCV was installed
        libs = os.environ["DDMIM_FFCV_LIB"] + os.pathsep + env.get("LD_LIBRARY_PATH", "")
        ffcv_env = {**env, "LD_LIBRARY_PATH": libs}
    s = Suite(args.out, work, args.dry_run, sys.executable, env, ffcv_env, mode)
    started = time.monotonic()
    s.probe = probe(s)
    if not args.dry_run and not s.probe["cuda"]:
        print("gpu_suite: no CUDA device here; rehearse on a CPU with --dry-run", file=sys.stderr)
        return 2
    print(f"gpu suite{' (dry run)' if args.dry_run else ''} on {s.probe['device']}: {len(STEPS)} steps, "
          f"results in {args.out}", flush=True)
    entries = []
    for step in STEPS:
        if args.only and step.name not in args.only:
            continue
        entry = run_step(s, step, started)
        entries.append(entry)
        print(f"== {step.name}: {entry['status']} ({entry['seconds']:.0f} s) "
              f"{entry.get('headline') or entry['reason']}", flush=True)
        write_summary(s, entries, time.monotonic() - started)
    seconds = time.monotonic() - started
    write_summary(s, entries, seconds)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    failed = [e["name"] for e in entries if e["status"] == "failed"]
    print(f"{len(entries) - len(failed)} of {len(entries)} steps passed or could not run here; "
          f"{'failed: ' + ', '.join(failed) if failed else 'none failed'} ({seconds:.0f} s); {args.out}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
