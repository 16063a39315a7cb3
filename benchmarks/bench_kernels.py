"""Time pidrt's Triton kernels against unfused torch on SD1.5 shapes (GPU).

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h200
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --out /tmp/smoke --smoke   # CPU: the script runs

writes <out>.json and <out>.md. For each case it reports the median time (triton.testing.do_bench)
of the fused kernel (few-token branch, dual-KV attention, and the candidate GroupNorm+SiLU) and of
the torch versions it replaces, the max abs error against the torch
reference, and "% of floor": the floor is max(bytes moved / peak bandwidth, flops / peak flop/s)
for the kernel's unavoidable traffic and useful (unpadded) flops. The peaks are NOMINAL datasheet
numbers (dense fp16 989e12 flop/s for H100 and H200 SXM; HBM 3.35e12 B/s H100, 4.8e12 B/s H200,
picked by the device's name unless given), not measured ones, so a percentage is a guide to
headroom, not a measured utilisation. --smoke runs tiny shapes on CPU in the Triton interpreter
(timings meaningless; it checks the script).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FEW_TOKEN_CASES = [(320, 4096), (640, 1024), (1280, 256), (1280, 64)]  # (C, N) per UNet level
DUAL_KV_LEVELS = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (N, d)
CROSS_TOKENS = (77, 256)  # EAA cross-attention: the prompt's keys, then s_c aggregated identity tokens
# (C, H=W) of ResNet norms at 512 px: each level's width and its widest up-block input (skip concat).
GROUP_NORM_CASES = [(320, 64), (960, 64), (640, 32), (1920, 32), (1280, 16), (2560, 8)]
SMOKE = {"few_token": [(64, 20)], "dual_kv": [(20, 16)], "cross": (7, 12), "heads": 2, "group_norm": [(64, 5)]}
# --sweep: tiles timed besides the defaults (warps stay the defaults: 8, dual-KV head dim 160: 4).
FEW_TOKEN_SWEEP = [(32, 64), (64, 64), (128, 64), (64, 128)]  # (block_n, block_c)
DUAL_KV_SWEEP = [(128, 64), (64, 64), (64, 32), (32, 32), (32, 16)]  # (block_m, block_n)
GROUP_NORM_SWEEP = [16, 32, 128]  # block_hw (pixels per chunk); the default is 64
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # datasheet (SXM); the first name found wins


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path stem: writes <out>.json and <out>.md")
    p.add_argument("--peak-flops", type=float, default=989e12, help="nominal peak flop/s (default 989e12)")
    p.add_argument("--peak-bw", type=float, default=None,
                   help="nominal peak memory B/s (default by device name: H200 4.8e12, else H100's 3.35e12)")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4, help="n, tokens per head of the few-token branch")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (needs TRITON_INTERPRET=1)")
    p.add_argument("--sweep", action="store_true",
                   help="also time other tile sizes (few-token cases, dual-KV self-attention cases): which "
                        "default to change, by measurement")
    return p.parse_args(argv)


def bench_few_token(args, torch, dtype, timer, device, cases):
    import torch.nn.functional as F

    from pidrt.kernels.few_token import few_token_branch
    from pidrt.models.folded import FoldedBranch, apply_folded, fold_branch

    B, H, n, elt = args.batch, args.heads, args.tokens, torch.finfo(dtype).bits // 8
    rows = []
    for c, tokens in cases:
        d = c // H
        dev = device
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
        t = {name: timer(fn) for name, fn in (("triton_fused", fused), ("torch_folded", folded),
                                              ("torch_unfolded", unfolded))}
        t["triton_scale0"] = timer(lambda: few_token_branch(base, x, branch, 0.0, out=out))
        sweep = {f"block_n={bn} block_c={bc}": timer(lambda bn=bn, bc=bc: few_token_branch(
                     base, x, branch, scale, out=out, block_n=bn, block_c=bc))
                 for bn, bc in FEW_TOKEN_SWEEP} if args.sweep else None
        rows.append({"kernel": "few_token", "case": f"C={c} N={tokens} B={B} H={H} n={n}", "ms": t,
                     "bytes": nbytes, "flops": flops, "floor_ms": floor * 1e3,
                     "pct_of_floor": 100 * floor * 1e3 / t["triton_fused"], "max_abs_err": err, "sweep": sweep})
    return rows


def bench_dual_kv(args, torch, dtype, timer, device, levels, cross):
    import torch.nn.functional as F

    from pidrt.kernels.dual_kv import dual_kv_attention
    from pidrt.kernels.reference import dual_kv_reference

    B, H, elt = args.batch, args.heads, torch.finfo(dtype).bits // 8
    rows = []
    for tokens, d in levels:
        for kind, m1, m2 in (("self", tokens, tokens), ("cross", *cross)):
            mk = lambda m: torch.randn(B, H, m, d, device=device, dtype=dtype)  # noqa: E731
            q, k1, v1, k2, v2 = mk(tokens), mk(m1), mk(m1), mk(m2), mk(m2)
            sigma = torch.full((B,), 0.8, device=device)
            out = torch.empty_like(q)
            fused = lambda: dual_kv_attention(q, k1, v1, k2, v2, sigma, out=out)  # noqa: E731
            two_sdpa = lambda: dual_kv_reference(q, k1, v1, k2, v2, sigma)  # noqa: E731
            ref = dual_kv_reference(*(t.float() for t in (q, k1, v1, k2, v2)), sigma)
            err = (fused().float() - ref).abs().max().item()
            nbytes = (2 * B * H * tokens * d + 2 * B * H * (m1 + m2) * d) * elt
            flops = 4 * B * H * tokens * d * (m1 + m2)
            floor = max(nbytes / args.peak_bw, flops / args.peak_flops)
            t = {name: timer(fn) for name, fn in (("triton_fused", fused), ("torch_2x_sdpa", two_sdpa))}
            t["triton_sigma0"] = timer(lambda: dual_kv_attention(q, k1, v1, k2, v2, 0.0, out=out))
            t["torch_1x_sdpa"] = timer(lambda: F.scaled_dot_product_attention(q, k1, v1))
            sweep = {f"block_m={bm} block_n={bn}": timer(lambda bm=bm, bn=bn: dual_kv_attention(
                         q, k1, v1, k2, v2, sigma, out=out, block_m=bm, block_n=bn))
                     for bm, bn in DUAL_KV_SWEEP} if args.sweep and kind == "self" else None
            rows.append({"kernel": f"dual_kv_{kind}", "case": f"N={tokens} d={d} M1={m1} M2={m2} B={B} H={H}",
                         "ms": t, "bytes": nbytes, "flops": flops, "floor_ms": floor * 1e3,
                         "pct_of_floor": 100 * floor * 1e3 / t["triton_fused"], "max_abs_err": err,
                         "sweep": sweep})
    return rows


def bench_group_norm(args, torch, dtype, timer, device, cases):
    """GroupNorm(x + temb) -> SiLU of a ResNet block (32 groups): the fused kernel in NHWC (and NCHW)
    against torch, in channels_last including the copy back to channels_last the next conv makes
    (torch's CUDA GroupNorm returns NCHW), and in NCHW."""
    import torch.nn.functional as F

    from pidrt.kernels.group_norm import group_norm
    from pidrt.kernels.reference import group_norm_reference

    B, G, elt = args.batch, 32, torch.finfo(dtype).bits // 8
    rows = []
    for c, side in cases:
        x_nchw = torch.randn(B, c, side, side, device=device, dtype=dtype)
        x = x_nchw.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
        temb = torch.randn(B, c, device=device, dtype=dtype)
        out, out_nchw = torch.empty_like(x), torch.empty_like(x_nchw)

        def torch_op(inp):
            return F.silu(F.group_norm(inp + temb[:, :, None, None], G, w, b, 1e-5))

        fused = lambda: group_norm(x, w, b, G, shift=temb, silu=True, out=out)  # noqa: E731
        ref = group_norm_reference(x.float(), w.float(), b.float(), G, shift=temb.float(), silu=True)
        err = (fused().float() - ref).abs().max().item()
        nbytes = 2 * B * c * side * side * elt
        floor = nbytes / args.peak_bw
        t = {
            "triton_fused": timer(fused),
            "triton_nchw": timer(lambda: group_norm(x_nchw, w, b, G, shift=temb, silu=True, out=out_nchw)),
            "torch_nhwc": timer(lambda: torch_op(x).contiguous(memory_format=torch.channels_last)),
            "torch_nchw": timer(lambda: torch_op(x_nchw)),
        }
        sweep = {f"block_hw={bh}": timer(lambda bh=bh: group_norm(x, w, b, G, shift=temb, silu=True, out=out,
                                                                   block_hw=bh))
                 for bh in GROUP_NORM_SWEEP} if args.sweep else None
        rows.append({"kernel": "group_norm_silu", "case": f"C={c} {side}x{side} B={B} G={G} NHWC", "ms": t,
                     "bytes": nbytes, "flops": 0, "floor_ms": floor * 1e3,
                     "pct_of_floor": 100 * floor * 1e3 / t["triton_fused"], "max_abs_err": err, "sweep": sweep})
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# pidrt kernel benchmark: {meta['device']} ({meta['dtype']})"
        f"{'' if meta['complete'] else ' (INCOMPLETE: the run stopped early)'}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit']}, {meta['date']}. "
        f"Median ms ({meta['timing']}). Floor = max(bytes / {meta['peak_bw']:.3g} B/s, "
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
    if meta.get("failed"):
        lines += ["", *(f"FAILED {k}: {why}" for k, why in meta["failed"].items())]
    swept = [r for r in rows if r.get("sweep")]
    if swept:
        lines += ["", "Tile sweep (median ms; the default is the triton ms above):", "",
                  "| kernel | case | default ms | best tile | best ms | all |", "|---|---|---|---|---|---|"]
        for r in swept:
            best = min(r["sweep"], key=r["sweep"].get)
            every = ", ".join(f"{k} {v:.4f}" for k, v in r["sweep"].items())
            lines.append(f"| {r['kernel']} | {r['case']} | {r['ms']['triton_fused']:.4f} | {best} | "
                         f"{r['sweep'][best]:.4f} | {every} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_kernels.py --smoke runs the kernels on CPU: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA device; none found (--smoke checks the script on CPU).", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.smoke:
        args.heads = SMOKE["heads"]
    name = common.device_name(device)
    if args.peak_bw is None:
        args.peak_bw = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), HBM_BYTES_PER_S["H100"])
    torch.manual_seed(0)
    timer = lambda fn: common.median_ms(fn, device, args.warmup, args.rep)  # noqa: E731
    few = SMOKE["few_token"] if args.smoke else FEW_TOKEN_CASES
    levels, cross = (SMOKE["dual_kv"], SMOKE["cross"]) if args.smoke else (DUAL_KV_LEVELS, CROSS_TOKENS)
    norms = SMOKE["group_norm"] if args.smoke else GROUP_NORM_CASES
    run = common.run_meta(device, dtype=args.dtype, batch=args.batch, heads=args.heads, tokens=args.tokens,
                          peak_flops=args.peak_flops, peak_bw=args.peak_bw, peaks_are_nominal=True,
                          smoke=args.smoke, sweep=args.sweep, timing="triton.testing.do_bench median" if device.type == "cuda"
                          else "perf_counter median (interpreter: meaningless)")
    sections = {"few_token": lambda: bench_few_token(args, torch, dtype, timer, device, few),
                "dual_kv": lambda: bench_dual_kv(args, torch, dtype, timer, device, levels, cross),
                "group_norm": lambda: bench_group_norm(args, torch, dtype, timer, device, norms)}
    rows, failed = [], {}
    for i, (kernel, section) in enumerate(sections.items()):
        try:
            rows += section()
        except Exception as exc:  # noqa: BLE001 - a kernel that fails here must not cost the others' rows
            failed[kernel] = common.failure(kernel, exc)
        # Rewritten after every kernel: a run stopped by a time limit keeps what it measured.
        meta = {**run, "complete": i == len(sections) - 1, "failed": failed}
        common.write_outputs(args.out, {"meta": meta, "rows": rows}, markdown(meta, rows), echo=meta["complete"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
