"""SwinV2 window attention: timm's written-out attention against ddmim's scaled_dot_product_attention one
(`ddmim.models.window_attention`), forward + backward, at Swin-T's stage shapes (224 px, window 7).

    python benchmarks/bench_attention.py [--batch 128] [--dtype bf16] [--json PATH]

Both run on the same module weights (a per-head logit scale and a position-bias MLP drawn at random, so that
neither is trivial), with and without the shifted-window mask. Per case: median ms of each (CUDA: do_bench;
CPU: median of repeats), their ratio, and the largest difference of the outputs and of the gradients, relative
to the largest value. Writes benchmarks/results/attention-<device>.json, or --json.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import median_seconds, write_results
from ddmim.models.window_attention import FusedWindowAttention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-12))


def stage_cases(batch: int, device: torch.device):
    """(stage, shifted, timm attention, fused copy, input, shift mask) for the first two blocks of each stage."""
    torch.manual_seed(0)
    net = SwinTransformerV2(img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                            window_size=7, num_classes=0).to(device)
    for stage, layer in enumerate(net.layers):
        grid = 56 // 2**stage
        windows = (grid // min(7, grid)) ** 2
        for block in list(layer.blocks)[:2]:
            attn = block.attn
            with torch.no_grad():
                attn.logit_scale.uniform_(1.5, 3.5)  # per-head scales of 4.5 to 33 around the init of 10
                attn.cpb_mlp[2].weight.normal_()
            fused = copy.deepcopy(attn)
            fused.__class__ = FusedWindowAttention
            mask = getattr(block, "attn_mask", None)
            x = torch.randn(batch * windows, attn.window_size[0] * attn.window_size[1], attn.dim, device=device)
            yield stage, mask is not None, attn, fused, x, mask


def time_fwd_bwd(module, x, mask, dtype, device, repeats: int = 7) -> float:
    x = x.detach().requires_grad_()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = module(x, mask)
        out.float().sum().backward()

    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(step, return_mode="median")
    return 1000 * median_seconds(step, warmup=2, repeats=repeats, sync=lambda: None)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=128 if cuda else 2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats on the CPU (a GPU uses do_bench)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda" if cuda else "cpu"), DTYPES[args.dtype]
    rows = []
    for stage, shifted, timm_attn, fused, x, mask in stage_cases(args.batch, device):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = timm_attn(xa, mask), fused(xb, mask)  # fp32: the exactness figures
        grad = torch.randn_like(out_a)
        grads_a = torch.autograd.grad(out_a, [xa, *timm_attn.parameters()], grad)
        grads_b = torch.autograd.grad(out_b, [xb, *fused.parameters()], grad)
        timm_ms = time_fwd_bwd(timm_attn, x, mask, dtype, device, args.repeats)
        fused_ms = time_fwd_bwd(fused, x, mask, dtype, device, args.repeats)
        rows.append({"stage": stage, "shifted": shifted, "windows": x.shape[0], "dim": timm_attn.dim,
                     "heads": timm_attn.num_heads, "timm_ms": timm_ms, "fused_ms": fused_ms,
                     "speedup": timm_ms / fused_ms, "forward_rel_err": relative_error(out_a, out_b),
                     "grad_rel_err": max(relative_error(a, b) for a, b in zip(grads_a, grads_b))})
    print(f"{'stage':>5}{'shift':>7}{'windows':>9}{'timm ms':>10}{'fused ms':>10}{'x timm':>8}{'fwd err':>10}"
          f"{'grad err':>10}")
    for r in rows:
        print(f"{r['stage']:>5}{str(r['shifted']):>7}{r['windows']:>9}{r['timm_ms']:>10.3f}{r['fused_ms']:>10.3f}"
              f"{r['speedup']:>8.2f}{r['forward_rel_err']:>10.1e}{r['grad_rel_err']:>10.1e}")
    total = sum(r["timm_ms"] for r in rows) / sum(r["fused_ms"] for r in rows)
    print(f"all cases: fused {total:.2f}x timm's time ({args.dtype}, batch {args.batch}, {device})")
    payload = {"device": str(device), "batch": args.batch, "dtype": args.dtype, "rows": rows, "total_speedup": total}
    print(f"wrote {write_results('attention', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
