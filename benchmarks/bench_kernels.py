"""Fused Triton kernels against eager PyTorch and torch.compile of the same reference, at the seed's real shapes.

    python benchmarks/bench_kernels.py [--batch 128] [--size 224] [--dtypes bf16 fp32] [--json PATH]

Forward + backward of the masked reconstruction loss (B x 3 x size x size, a token mask of size/4) and of the
unmasked per-stage feature loss (each Swin-T stage output), and mask generation + downsampling. On CUDA: median
times from `triton.testing.do_bench`, bytes that must move, achieved GB/s against this device's measured copy
bandwidth, and peak memory beyond the inputs. On a CPU the same cases run at small shapes (default batch 2,
32 px) with the kernels in Triton's interpreter: a rehearsal of the script, whose timings say nothing of a GPU.
Ratios come from the same run. Writes benchmarks/results/kernels-<device>.json, or --json.

    python benchmarks/bench_kernels.py --aot [--presets seed simmim mae_vit_s16] [--batch 128] [--arch 90]

No GPU needed: every kernel specialisation those presets launch (bf16 and fp32, contiguous and channels-last,
training and validation) compiled ahead of time for cuda sm_<arch> by Triton's compiler and bundled ptxas, with
the registers, spills and shared memory of each. Writes benchmarks/results/kernels-aot-sm<arch>.json, or --json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

AOT = "--aot" in sys.argv  # compiling for a GPU needs the real JIT, not the interpreter
if not torch.cuda.is_available() and not AOT:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

from pathlib import Path

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import RESULTS, median_seconds, write_results  # noqa: E402
from ddmim.models.losses import reconstruction_loss  # noqa: E402
from ddmim.models.masking import base_token_mask, stage_masks  # noqa: E402
from ddmim_kernels.mask_gen import fused_masks  # noqa: E402
from ddmim_kernels.masked_loss import masked_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWIN_T_WIDTHS = (96, 192, 384, 768)  # stage i's tokens: (size / 4 / 2^i) per side
RATIOS = [0.5, 0.5, 0.5, 0.0]


def recon_cases(batch, size, dtype, device):
    pred = torch.randn(batch, 3, size, size, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    mask = torch.rand(batch, size // 4, size // 4, device=device) >= 0.5
    mask_f = mask.to(dtype)
    eager = lambda: reconstruction_loss(pred, target, mask_f)  # noqa: E731
    fused = lambda: masked_loss(pred, target, mask)  # noqa: E731
    moved = 3 * pred.numel() * pred.element_size() + mask.numel()  # read pred, target, mask; write grad
    return pred, eager, fused, moved


def feature_cases(batch, grid, dim, dtype, device):
    s = torch.randn(batch, grid, grid, dim, device=device, dtype=dtype, requires_grad=True)
    t = torch.randn(batch, grid, grid, dim, device=device, dtype=dtype)
    eager = lambda: F.smooth_l1_loss(s.float(), t.float())  # noqa: E731
    fused = lambda: masked_loss(s, t, None)  # noqa: E731
    return s, eager, fused, 3 * s.numel() * s.element_size()


def copy_bandwidth_gbs(device) -> float:
    from triton.testing import do_bench

    src = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def time_fwd_bwd(fn, leaf, device):
    """(median ms of forward + backward, peak bytes allocated beyond what existed before; None on a CPU)."""
    def step():
        fn().backward()

    step()
    leaf.grad = None
    if device.type != "cuda":
        seconds, _ = median_seconds(step, warmup=1, repeats=5, sync=lambda: None)
        return 1000 * seconds, None
    from triton.testing import do_bench

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    leaf.grad = None
    return do_bench(step, grad_to_none=[leaf], return_mode="median"), extra


def bench(batch: int, size: int, dtypes: list[str], device: torch.device, backend: str) -> dict:
    copy_gbs = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        cases = [(f"recon 3x{size}x{size} mask {size // 4}", *recon_cases(batch, size, dtype, device))]
        grids = [size // 4 // 2**i for i in range(len(SWIN_T_WIDTHS))]
        cases += [(f"feature {g}x{g}x{d}", *feature_cases(batch, g, d, dtype, device))
                  for g, d in zip(grids, SWIN_T_WIDTHS)]
        for name, leaf, eager, fused, moved in cases:
            timings = {}
            for variant, fn in (("eager", eager), ("compile", torch.compile(eager, backend=backend)),
                                ("triton", fused)):
                ms, extra = time_fwd_bwd(fn, leaf, device)
                timings[variant] = {"ms": ms, "gbs": moved / (ms * 1e-3) / 1e9, "peak_extra_bytes": extra}
            rows.append({"case": name, "dtype": dname, "batch": batch, "bytes_moved": moved, **timings,
                         "speedup_vs_eager": timings["eager"]["ms"] / timings["triton"]["ms"],
                         "speedup_vs_compile": timings["compile"]["ms"] / timings["triton"]["ms"],
                         "share_of_copy_bandwidth": timings["triton"]["gbs"] / copy_gbs if copy_gbs else None,
                         "grad_bytes": leaf.numel() * leaf.element_size()})
            del leaf
    mask_rows = bench_masks(batch, size // 4, device)
    if copy_gbs:
        print(f"device copy bandwidth: {copy_gbs:.0f} GB/s")
    print(f"{'case':<26}{'dtype':>6}{'eager ms':>10}{'compile ms':>11}{'triton ms':>10}{'x eager':>9}"
          f"{'x compile':>10}{'% copy bw':>10}{'extra MB':>10}")
    for r in rows:
        bw = f"{100 * r['share_of_copy_bandwidth']:.1f}" if r["share_of_copy_bandwidth"] else "n/a"
        extra = r["triton"]["peak_extra_bytes"]
        print(f"{r['case']:<26}{r['dtype']:>6}{r['eager']['ms']:>10.3f}{r['compile']['ms']:>11.3f}"
              f"{r['triton']['ms']:>10.3f}{r['speedup_vs_eager']:>9.2f}{r['speedup_vs_compile']:>10.2f}"
              f"{bw:>10}{(f'{extra / 2**20:.1f}' if extra is not None else 'n/a'):>10}")
    for r in mask_rows:
        print(f"masks B={batch} {size // 4}x{size // 4} {r['variant']:<8} {r['ms']:.4f} ms")
    if device.type != "cuda":
        print("a CPU rehearsal: the kernels ran in Triton's interpreter; these timings say nothing of a GPU")
    return {"device": str(device), "size": size, "compile_backend": backend, "copy_bandwidth_gbs": copy_gbs,
            "loss_rows": rows, "mask_rows": mask_rows}


def bench_masks(batch, grid, device):
    def reference():
        base = base_token_mask(batch, grid, 0.5, device=device)
        return [m.contiguous() for m in stage_masks(base, RATIOS) if m is not None]

    fused = lambda: fused_masks(batch, grid, RATIOS, seed=0, offset=0, device=device)  # noqa: E731
    if device.type == "cuda":
        from triton.testing import do_bench

        return [{"variant": name, "ms": do_bench(fn, return_mode="median")}
                for name, fn in (("torch", reference), ("triton", fused))]
    return [{"variant": name, "ms": 1000 * median_seconds(fn, warmup=1, repeats=5, sync=lambda: None)[0]}
            for name, fn in (("torch", reference), ("triton", fused))]


def aot(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("--aot compiles with Triton's real JIT: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from benchmarks.aot_launches import aot_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aot", action="store_true")
    parser.add_argument("--presets", nargs="+", default=["seed", "simmim", "mae_vit_s16"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 90 is Hopper (H100, H200)")
    parser.add_argument("--json", help="results file (default benchmarks/results/kernels-aot-sm<arch>.json)")
    args = parser.parse_args(argv)
    rows = aot_rows(args.presets, args.batch, args.arch)
    print(f"{'kernel':26} {'regs':>4} {'spill B':>7} {'smem B':>6}  first made by")
    for r in rows:
        print(f"{r['kernel']:26} {r['registers']:4d} {r['spill_stores'] + r['spill_loads']:7d} "
              f"{r['shared_bytes']:6d}  {r['label']}")
    payload = {"presets": args.presets, "batch": args.batch, "arch": rows[0]["arch"] if rows else None,
               "specialisations": len(rows), "rows": rows}
    path = write_results("kernels-aot", payload, args.json or RESULTS / f"kernels-aot-sm{args.arch}.json")
    print(f"{len(rows)} specialisations, {sum(r['spill_stores'] + r['spill_loads'] > 0 for r in rows)} with "
          f"spills; wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--aot" in argv:
        return aot(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=128 if cuda else 2)
    parser.add_argument("--size", type=int, default=224 if cuda else 32, help="image side, a multiple of 32")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the reference")
    parser.add_argument("--json", help="results file (default benchmarks/results/kernels-<device>.json)")
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error(f"--size must be a multiple of 32 (four stages of a patch-4 Swin), got {args.size}")
    payload = bench(args.batch, args.size, args.dtypes, torch.device("cuda" if cuda else "cpu"),
                    args.compile_backend)
    print(f"wrote {write_results('kernels', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
