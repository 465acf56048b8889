"""Fused Triton kernels against eager PyTorch and torch.compile, at the seed's real shapes.

    python benchmarks/bench_kernels.py [--batch 128] [--dtypes bf16 fp32]

On CUDA: forward + backward of the masked reconstruction loss (B x 3 x 224 x 224, 56 x 56 mask) and of the
unmasked per-stage feature loss (each Swin-T stage output), and mask generation + downsampling; median
time from `triton.testing.do_bench`, bytes that must move, achieved GB/s against this device's measured
copy bandwidth, and peak memory beyond the inputs. Ratios come from the same run.
On a CPU: runs the correctness checks in Triton's interpreter at small shapes and says that timings need a GPU.
Writes benchmarks/results/kernels-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import torch.nn.functional as F  # noqa: E402

from ddmim.models.losses import reconstruction_loss  # noqa: E402
from ddmim.models.masking import base_token_mask, stage_masks  # noqa: E402
from ddmim_benchmarks.common import write_results  # noqa: E402
from ddmim_kernels.mask_gen import fused_masks  # noqa: E402
from ddmim_kernels.masked_loss import masked_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWIN_T_STAGES = [(56, 96), (28, 192), (14, 384), (7, 768)]
RATIOS = [0.5, 0.5, 0.5, 0.0]


def recon_cases(batch, dtype, device):
    pred = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    mask = torch.rand(batch, 56, 56, device=device) >= 0.5
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


def time_fwd_bwd(fn, leaf):
    from triton.testing import do_bench

    def step():
        fn().backward()

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    leaf.grad = None
    return do_bench(step, grad_to_none=[leaf], return_mode="median"), extra


def bench_gpu(batch: int, dtypes: list[str]) -> dict:
    device = torch.device("cuda")
    copy_gbs = copy_bandwidth_gbs(device)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        cases = [("recon 3x224x224 mask 56", *recon_cases(batch, dtype, device))]
        cases += [(f"feature {g}x{g}x{d}", *feature_cases(batch, g, d, dtype, device)) for g, d in SWIN_T_STAGES]
        for name, leaf, eager, fused, moved in cases:
            compiled_fn = torch.compile(eager)
            timings = {}
            for variant, fn in (("eager", eager), ("compile", compiled_fn), ("triton", fused)):
                ms, extra = time_fwd_bwd(fn, leaf)
                timings[variant] = {"ms": ms, "gbs": moved / (ms * 1e-3) / 1e9, "peak_extra_bytes": extra}
            rows.append({"case": name, "dtype": dname, "batch": batch, "bytes_moved": moved, **timings,
                         "speedup_vs_eager": timings["eager"]["ms"] / timings["triton"]["ms"],
                         "speedup_vs_compile": timings["compile"]["ms"] / timings["triton"]["ms"],
                         "share_of_copy_bandwidth": timings["triton"]["gbs"] / copy_gbs,
                         "grad_bytes": leaf.numel() * leaf.element_size()})
            del leaf
    mask_rows = bench_masks_gpu(batch, device)
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s")
    print(f"{'case':<26}{'dtype':>6}{'eager ms':>10}{'compile ms':>11}{'triton ms':>10}{'x eager':>9}"
          f"{'x compile':>10}{'% copy bw':>10}{'extra MB':>10}")
    for r in rows:
        print(f"{r['case']:<26}{r['dtype']:>6}{r['eager']['ms']:>10.3f}{r['compile']['ms']:>11.3f}"
              f"{r['triton']['ms']:>10.3f}{r['speedup_vs_eager']:>9.2f}{r['speedup_vs_compile']:>10.2f}"
              f"{100 * r['share_of_copy_bandwidth']:>10.1f}{r['triton']['peak_extra_bytes'] / 2**20:>10.1f}")
    for r in mask_rows:
        print(f"masks B={batch} 56x56 {r['variant']:<8} {r['ms']:.4f} ms")
    return {"copy_bandwidth_gbs": copy_gbs, "loss_rows": rows, "mask_rows": mask_rows}


def bench_masks_gpu(batch, device):
    from triton.testing import do_bench

    def reference():
        base = base_token_mask(batch, 56, 0.5, device=device)
        return [m.contiguous() for m in stage_masks(base, RATIOS) if m is not None]

    fused = lambda: fused_masks(batch, 56, RATIOS, seed=0, offset=0, device=device)  # noqa: E731
    return [{"variant": name, "ms": do_bench(fn, return_mode="median")}
            for name, fn in (("torch", reference), ("triton", fused))]


def check_cpu() -> dict:
    """The correctness part at small shapes, in Triton's interpreter."""
    g = torch.Generator().manual_seed(0)
    checks = {}
    for dname, dtype in DTYPES.items():
        pred = torch.randn(2, 3, 32, 32, generator=g).to(dtype).requires_grad_()
        target = torch.randn(2, 3, 32, 32, generator=g).to(dtype)
        mask = torch.rand(2, 8, 8, generator=g) >= 0.5
        fused = masked_loss(pred, target, mask)
        fused.backward()
        ref_in = pred.detach().double().requires_grad_()
        ref = reconstruction_loss(ref_in, target.double(), mask.double())
        ref.backward()
        checks[f"recon_{dname}_loss_rel_err"] = abs(fused.item() - ref.item()) / abs(ref.item())
        checks[f"recon_{dname}_grad_max_abs_err"] = (pred.grad.double() - ref_in.grad).abs().max().item()
    base, stages = fused_masks(4, 16, RATIOS, seed=0, offset=0, device="cpu")
    checks["stage_masks_bit_exact"] = all(torch.equal(s, base[:, :: 2**i, :: 2**i])
                                          for i, s in enumerate(stages) if s is not None)
    for name, value in checks.items():
        print(f"{name:<32} {value}")
    print("timings need a GPU: this machine has no CUDA device, so only correctness was checked "
          "(Triton interpreter)")
    return {"checks": checks, "timings": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    args = parser.parse_args(argv)
    payload = bench_gpu(args.batch, args.dtypes) if torch.cuda.is_available() else check_cpu()
    print(f"wrote {write_results('kernels', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
