"""What each step of the GPU suite is expected to take on an H100 or H200, and which steps a budget has room for.

    python benchmarks/gpu_suite.py --plan [--budget 420]   (prints the plan for an H100 and an H200)

The cost model, stated here because no step has been timed on such a GPU yet:
- starting a process (imports, CUDA context): 10 s;
- torch.compile with inductor of Swin-T's training forward and backward at one batch size: 60 s (some 300
  generated kernels built on 16 cores; published compile times of timm models of this size are 40-90 s cold);
- compute: 22.5 GFLOP per seed training image (student forward and backward, teacher forward; bench_train
  records the measured count), at 35% of the dense bf16 peak, 989.5 TFLOP/s on both the H100 SXM and the H200
  (the same tensor cores; the H200 differs in memory, which these compute-bound steps barely use);
- what else a step does (kernel JIT, photographs generated, conversions): a fixed time per step.
A step starts only when the budget's time left covers its estimate, so the plan is the suite's own rule run on
these estimates: each step is assumed to take exactly its estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

START_S = 10.0
COMPILE_S = 60.0
SEED_IMAGE_FLOPS = 22.5e9
ACHIEVED = 0.35
PEAK_BF16 = {"H100": 989.5e12, "H200": 989.5e12}
BUDGET_S = 420


@dataclass(frozen=True)
class Cost:
    starts: int = 1  # processes the step starts
    compiles: int = 0  # inductor compiles of the training step
    images: int = 0  # seed-sized training images through warm-up, timed, trial and FLOP-count steps
    fixed_s: float = 0.0  # everything else

    def seconds(self, gpu: str = "H100") -> float:
        compute = self.images * SEED_IMAGE_FLOPS / (PEAK_BF16[gpu] * ACHIEVED)
        return self.starts * START_S + self.compiles * COMPILE_S + compute + self.fixed_s


def timed_images(variants: int, batches: list[int], steps: int = 25) -> int:
    """Images of `variants` variants at each batch size: 3 warm-up and 5 x 4 timed steps, the compile trial
    and the FLOP count."""
    return variants * steps * sum(batches)


def plan(steps, budget: float, gpu: str, missing: tuple[str, ...] = ()) -> list[dict]:
    """The suite's rule on the estimates: [{name, estimate_s, start_s, finish_s (None: not run)}] in order;
    the steps that need a library in `missing` (ffcv, dali) do not run."""
    rows, now = [], 0.0
    for step in steps:
        estimate = round(step.cost.seconds(gpu), 1)
        why = f"no {step.needs} here" if step.needs in missing else "" if budget - now >= estimate else "no room left"
        rows.append({"name": step.name, "estimate_s": estimate, "start_s": round(now, 1),
                     "finish_s": None if why else round(now + estimate, 1), "not_run": why})
        runs = not why
        now += estimate if runs else 0.0
    return rows


def describe(rows: list[dict], budget: float, gpu: str, missing: tuple[str, ...]) -> str:
    lines = [f"{gpu}, {budget:.0f} s budget{', without ' + ' and '.join(missing) if missing else ''}: step, "
             f"estimate, expected finish"]
    for r in rows:
        finish = f"done at {r['finish_s']:6.1f} s" if r["finish_s"] is not None else f"not run ({r['not_run']})"
        lines.append(f"  {r['name']:<20}{r['estimate_s']:7.1f} s   {finish}")
    return "\n".join(lines)
