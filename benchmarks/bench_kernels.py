"""Time pidrt's Triton kernels against unfused torch on SD1.5 shapes (GPU only).

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100

writes <out>.json and <out>.md. For each case it reports the median time (triton.testing.do_bench)
of the fused kernel and of the torch versions it replaces, the max abs error against the torch
reference, and "% of floor": the floor is max(bytes moved / peak bandwidth, flops / peak flop/s)
for the kernel's unavoidable traffic and useful (unpadded) flops. The peaks are NOMINAL numbers
given on the command line (defaults: H100 SXM dense fp16 989e12 flop/s, HBM3 3.35e12 B/s), not
measured ones, so a percentage is a guide to headroom, not a measured utilisation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FEW_TOKEN_CASES = [(320, 4096), (640, 1024), (1280, 256), (1280, 64)]  # (C, N) per UNet level
DUAL_KV_LEVELS = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (N, d)
DEVICE = "cuda"  # module-level so a CPU smoke run (TRITON_INTERPRET=1) can point it elsewhere


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path stem: writes <out>.json and <out>.md")
    p.add_argument("--peak-flops", type=float, default=989e12, help="nominal peak flop/s (default 989e12)")
    p.add_argument("--peak-bw", type=float, default=3.35e12, help="nominal peak memory B/s (default 3.35e12)")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4, help="n, tokens per head of the few-token branch")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    return p.parse_args(argv)


def bench_few_token(args, torch, dtype, do_bench):
    import torch.nn.functional as F

    from pidrt.kernels.few_token import few_token_branch
    from pidrt.models.folded import FoldedBranch, apply_folded, fold_branch

    B, H, n, elt = args.batch, args.heads, args.tokens, torch.finfo(dtype).bits // 8
    rows = []
    for c, tokens in FEW_TOKEN_CASES:
        d = c // H
        dev = DEVICE
        x = torch.randn(B, tokens, c, device=dev, dtype=dtype)
        base = torch.randn(B, tokens, c, device=dev, dtype=dtype)
        w_q = torch.randn(c, c, device=dev, dtype=dtype) / math.sqrt(c)
        w_o = torch.randn(c, c, device=dev, dtype=dtype) / math.sqrt(c)
        keys = torch.randn(B, n, c, device=dev, dtype=dtype)
        values = torch.randn(B, n, c, device=dev, dtype=dtype)
        branch: FoldedBranch = fold_branch(w_q.float(), keys.float(), values.float(), w_o.float(), H).to(dtype=dtype)
        scale = torch.full((B,), 0.4, device=dev)
        k_h = keys.view(B, n, H, d).transpose(1, 2)
        v_h = values.view(B, n, H, d).transpose(1, 2)

        def unfolded():  # what the folding replaces: q projection, SDPA over n keys, to_out
            q = (x @ w_q).view(B, tokens, H, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k_h, v_h).transpose(1, 2).reshape(B, tokens, c)
            return base + scale.to(dtype).view(-1, 1, 1) * (o @ w_o)

        out = torch.empty_like(base)
        fused = lambda: few_token_branch(base, x, branch, scale, out=out)  # noqa: E731
        folded = lambda: apply_folded(base, x, branch, scale)  # noqa: E731
        ref = apply_folded(base.float(), x.float(), branch.to(dtype=torch.float32), scale)
        err = (fused().float() - ref).abs().max().item()
        nbytes = 3 * B * tokens * c * elt + branch.a.numel() * elt + branch.b.numel() * elt
        flops = 2 * 2 * B * tokens * c * H * n
        floor = max(nbytes / args.peak_bw, flops / args.peak_flops)
        t = {name: do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
             for name, fn in (("triton_fused", fused), ("torch_folded", folded), ("torch_unfolded", unfolded))}
        t["triton_scale0"] = do_bench(lambda: few_token_branch(base, x, branch, 0.0, out=out),
                                      warmup=args.warmup, rep=args.rep, return_mode="median")
        rows.append({"kernel": "few_token", "case": f"C={c} N={tokens} B={B} H={H} n={n}", "ms": t,
                     "bytes": nbytes, "flops": flops, "floor_ms": floor * 1e3,
                     "pct_of_floor": 100 * floor * 1e3 / t["triton_fused"], "max_abs_err": err})
    return rows


def bench_dual_kv(args, torch, dtype, do_bench):
    import torch.nn.functional as F

    from pidrt.kernels.dual_kv import dual_kv_attention
    from pidrt.kernels.reference import dual_kv_reference

    B, H, elt = args.batch, args.heads, torch.finfo(dtype).bits // 8
    rows = []
    for tokens, d in DUAL_KV_LEVELS:
        for kind, m1, m2 in (("self", tokens, tokens), ("cross", 77, 256)):
            mk = lambda m: torch.randn(B, H, m, d, device=DEVICE, dtype=dtype)  # noqa: E731
            q, k1, v1, k2, v2 = mk(tokens), mk(m1), mk(m1), mk(m2), mk(m2)
            sigma = torch.full((B,), 0.8, device=DEVICE)
            out = torch.empty_like(q)
            fused = lambda: dual_kv_attention(q, k1, v1, k2, v2, sigma, out=out)  # noqa: E731
            two_sdpa = lambda: dual_kv_reference(q, k1, v1, k2, v2, sigma)  # noqa: E731
            ref = dual_kv_reference(*(t.float() for t in (q, k1, v1, k2, v2)), sigma)
            err = (fused().float() - ref).abs().max().item()
            nbytes = (2 * B * H * tokens * d + 2 * B * H * (m1 + m2) * d) * elt
            flops = 4 * B * H * tokens * d * (m1 + m2)
            floor = max(nbytes / args.peak_bw, flops / args.peak_flops)
            t = {name: do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")
                 for name, fn in (("triton_fused", fused), ("torch_2x_sdpa", two_sdpa))}
            t["triton_sigma0"] = do_bench(lambda: dual_kv_attention(q, k1, v1, k2, v2, 0.0, out=out),
                                          warmup=args.warmup, rep=args.rep, return_mode="median")
            t["torch_1x_sdpa"] = do_bench(lambda: F.scaled_dot_product_attention(q, k1, v1),
                                          warmup=args.warmup, rep=args.rep, return_mode="median")
            rows.append({"kernel": f"dual_kv_{kind}", "case": f"N={tokens} d={d} M1={m1} M2={m2} B={B} H={H}",
                         "ms": t, "bytes": nbytes, "flops": flops, "floor_ms": floor * 1e3,
                         "pct_of_floor": 100 * floor * 1e3 / t["triton_fused"], "max_abs_err": err})
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# pidrt kernel benchmark: {meta['device']} ({meta['dtype']})",
        "",
        f"Median ms from triton.testing.do_bench. Floor = max(bytes / {meta['peak_bw']:.3g} B/s, "
        f"flops / {meta['peak_flops']:.3g} flop/s); both peaks are NOMINAL (not measured).",
        "",
        "| kernel | case | triton ms | torch ms (versions) | speedup vs best torch | floor ms | % of floor | max abs err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["ms"]
        torch_t = {k: v for k, v in t.items() if k.startswith("torch")}
        best = min(torch_t.values())
        extra = ", ".join(f"{k.removeprefix('torch_')} {v:.4f}" for k, v in torch_t.items())
        skip = ", ".join(f"{k.removeprefix('triton_')} {v:.4f}" for k, v in t.items()
                         if k.startswith("triton_") and k != "triton_fused")
        lines.append(f"| {r['kernel']} | {r['case']} | {t['triton_fused']:.4f} ({skip}) | {extra} | "
                     f"{best / t['triton_fused']:.2f}x | {r['floor_ms']:.4f} | {r['pct_of_floor']:.1f} | "
                     f"{r['max_abs_err']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA device; none found.", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    rows = bench_few_token(args, torch, dtype, do_bench) + bench_dual_kv(args, torch, dtype, do_bench)
    meta = {"device": torch.cuda.get_device_name(0), "dtype": args.dtype, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "peak_flops": args.peak_flops,
            "peak_bw": args.peak_bw, "peaks_are_nominal": True}
    out = Path(args.out)
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(meta, rows)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
