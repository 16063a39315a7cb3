"""GroupNorm with the ResNet block's neighbours fused: out = act(GN(x + shift[b, c]) * w + b).

A candidate for #5's "whatever else the profile shows" (item 3), off by default until measured
(`FastTorchConfig.fused_norms`). Why it may pay on a GPU: every SD1.5 ResNet block runs
GroupNorm -> SiLU twice (the second after adding the time embedding), and torch's CUDA GroupNorm
(up to at least 2.11) has no channels_last kernel: it copies an NHWC input to NCHW and returns
NCHW, which the next channels_last convolution copies back. Per call that is the add, the norm's
two passes, the SiLU and two layout copies; here it is two kernels that read x twice (the second
read mostly from L2) and write once, in whichever layout x has.

1. Statistics: one program per (batch element, GP whole groups, chunk of BLOCK_HW pixels)
   writes each group's chunk mean and centred sum of squares (M2) in fp32.
2. Apply: each program first merges its groups' chunk partials (Chan's parallel formula, exact
   and free of the E[x^2] - E[x]^2 cancellation), then normalises `tiles` chunks of pixels.
No atomics: results are deterministic, which CUDA-graph replays of a step rely on for
reproducible images.

A program's tile is [BLOCK_HW pixels, GP groups, CP channels]: whole groups, each padded to a
power of two (cpg is 10, 20, 30, 40, 60, 80 in SD1.5), so group sums are plain reductions over
two axes and no group straddles two programs. The padding costs idle lanes, not memory traffic:
a group's channels are contiguous in NHWC and the padded lanes are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pidrt.errors import PidrtError
from pidrt.kernels import _common as C
from pidrt.kernels.aot import JitCall
from pidrt.kernels.reference import group_norm_reference

__all__ = ["group_norm", "group_norm_reference", "jit_calls"]


@triton.jit
def _channels(g0, cpg, G, GP: tl.constexpr, CP: tl.constexpr):
    """Channel offsets [GP, CP] of groups g0 .. g0+GP-1 (cpg channels each, padded to CP), and their mask."""
    g = g0 + tl.arange(0, GP)
    k = tl.arange(0, CP)
    return g[:, None] * cpg + k[None, :], (g < G)[:, None] & (k < cpg)[None, :]


@triton.jit
def _group_tile(b, g0, chunk, HW, cpg, G, sb, sc, shw, GP: tl.constexpr, CP: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Element offsets [BLOCK_HW, GP, CP] of those groups over one chunk of pixels, and the mask."""
    ch, c_ok = _channels(g0, cpg, G, GP, CP)
    rows = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs = b * sb + rows[:, None, None] * shw + ch[None, :, :] * sc
    return offs, (rows < HW)[:, None, None] & c_ok[None, :, :]


@triton.jit
def _group_norm_stats_kernel(
    X, Shift, Part,
    HW, cpg, G, S,
    sxb, sxc, sxhw, sshb, sshc,
    GP: tl.constexpr, CP: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g0 = tl.program_id(1) * GP
    s = tl.program_id(2)
    offs, mask = _group_tile(b, g0, s, HW, cpg, G, sxb, sxc, sxhw, GP, CP, BLOCK_HW)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if Shift is not None:
        ch, c_ok = _channels(g0, cpg, G, GP, CP)
        shift = tl.load(Shift + b * sshb + ch * sshc, mask=c_ok, other=0.0).to(tl.float32)
        x = tl.where(mask, x + shift[None, :, :], 0.0)  # padding stays 0: the sums count it out
    n = (tl.minimum(HW - s * BLOCK_HW, BLOCK_HW) * cpg).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=2), axis=0) / n  # [GP]
    d = tl.where(mask, x - mean[None, :, None], 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
    g = g0 + tl.arange(0, GP)
    ptr = Part + ((b * S + s) * G + g) * 2  # [B, S, G, (mean, M2)]
    tl.store(ptr, mean, mask=g < G)
    tl.store(ptr + 1, m2, mask=g < G)


@triton.jit
def _group_norm_apply_kernel(
    X, Shift, W, Bias, Part, Out,
    HW, cpg, G, S, tiles, eps,
    sxb, sxc, sxhw, sshb, sshc, sob, soc, sohw,
    GP: tl.constexpr, CP: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_S: tl.constexpr, SILU: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g0 = tl.program_id(1) * GP
    g = g0 + tl.arange(0, GP)

    # Merge the chunk partials of these groups: mean first, then M2 around it.
    total = HW * cpg * 1.0
    mean = tl.zeros([GP], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        n = (tl.minimum(HW - s * BLOCK_HW, BLOCK_HW) * cpg).to(tl.float32)
        ok = (s < S)[:, None] & (g < G)[None, :]
        part_mean = tl.load(Part + ((b * S + s[:, None]) * G + g[None, :]) * 2, mask=ok, other=0.0)
        mean += tl.sum(n[:, None] * part_mean, axis=0)
    mean = mean / total
    m2 = tl.zeros([GP], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        n = (tl.minimum(HW - s * BLOCK_HW, BLOCK_HW) * cpg).to(tl.float32)
        ok = (s < S)[:, None] & (g < G)[None, :]
        ptr = Part + ((b * S + s[:, None]) * G + g[None, :]) * 2
        dm = tl.load(ptr, mask=ok, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.where(ok, tl.load(ptr + 1, mask=ok, other=0.0) + n[:, None] * dm * dm, 0.0), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)

    # Per channel: y = (x - (mean - shift)) * rstd * w + bias, so the tile loop is load, FMA, store.
    ch, c_ok = _channels(g0, cpg, G, GP, CP)
    center = tl.broadcast_to(mean[:, None], (GP, CP))
    scale = tl.broadcast_to(rstd[:, None], (GP, CP))
    if Shift is not None:
        center -= tl.load(Shift + b * sshb + ch * sshc, mask=c_ok, other=0.0).to(tl.float32)
    if W is not None:
        scale *= tl.load(W + ch, mask=c_ok, other=0.0).to(tl.float32)
    offset = tl.zeros([GP, CP], dtype=tl.float32)
    if Bias is not None:
        offset = tl.load(Bias + ch, mask=c_ok, other=0.0).to(tl.float32)
    for t in range(0, tiles):
        chunk = tl.program_id(2) * tiles + t
        offs, mask = _group_tile(b, g0, chunk, HW, cpg, G, sxb, sxc, sxhw, GP, CP, BLOCK_HW)
        x = tl.load(X + offs, mask=mask, other=0.0)
        y = (x.to(tl.float32) - center[None, :, :]) * scale[None, :, :] + offset[None, :, :]
        if SILU:
            y = y / (1.0 + tl.exp2(-y * 1.4426950408889634))
        out_offs, _mask = _group_tile(b, g0, chunk, HW, cpg, G, sob, soc, sohw, GP, CP, BLOCK_HW)
        tl.store(Out + out_offs, y.to(Out.dtype.element_ty), mask=mask)


def _group_block(cpg: int) -> tuple[int, int]:
    """(GP, CP): groups per program and channels per group padded to a power of two, 128 lanes."""
    cp = C.next_pow2(cpg)
    return max(1, 128 // cp), cp


TILE = 8192  # elements of one program's tile (lanes x pixels)


def num_warps(lanes: int, block_hw: int, per_thread: int = 32) -> int:
    """About `per_thread` fp32 tile elements per thread: 32 for the statistics pass (8 warps on a
    64 x 128 tile: 48-128 registers per thread at SD1.5 shapes, more resident programs per SM for a
    memory-bound pass; benchmarks/results/kernel-resources-sm90-group-norm-2026-12-01.md), 64 for
    the apply pass (4 warps): at 8 or 16 warps ptxas spilled 4-24 bytes in the apply kernel
    without shift and SiLU (Triton 3.9 at 8, 3.6 at 16), at 4 neither does
    (benchmarks/results/kernel-resources-sm90-triton*-2026-12-02.md)."""
    return min(16, max(4, lanes * block_hw // (per_thread * 32)))


def _vector(name: str, t, channels: int, x: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.shape != (channels,) or not t.is_floating_point():
        raise PidrtError(f"{name} must be a [{channels}] float tensor, got "
                         f"{f'{tuple(t.shape)} {t.dtype}' if isinstance(t, torch.Tensor) else type(t).__name__}")
    C.check_device_dtype({"x": x, name: t})
    return t.contiguous()


def group_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float = 1e-5,
    *,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    out: torch.Tensor | None = None,
    block_hw: int = 64,
    tiles: int | None = None,
) -> torch.Tensor:
    """silu?(group_norm(x + shift[:, :, None, None], groups, weight, bias, eps)) in two launches.

    x [B, C, H, W], contiguous in NCHW or channels_last (anything else is made contiguous); the
    result has x's layout and dtype, statistics and arithmetic are fp32. weight/bias [C] or None
    (no affine); shift [B, C] or [B, C, 1, 1] (the ResNet block's time embedding), any float
    dtype. block_hw (pixels per chunk) and tiles (chunks per apply program) are tuning knobs.
    """
    C.check_tensor("x", x, 4)
    bsz, channels, height, width = x.shape
    if not isinstance(groups, int) or groups < 1 or channels % groups:
        raise PidrtError(f"groups must be a positive divisor of the {channels} channels, got {groups!r}")
    device = C.check_device_dtype({"x": x}, x.dtype)
    weight, bias = _vector("weight", weight, channels, x), _vector("bias", bias, channels, x)
    if shift is not None:
        if (not isinstance(shift, torch.Tensor) or shift.shape not in ((bsz, channels), (bsz, channels, 1, 1))
                or not shift.is_floating_point()):
            raise PidrtError(f"shift must be a float [{bsz}, {channels}] or [{bsz}, {channels}, 1, 1] tensor, got "
                             f"{tuple(shift.shape) if isinstance(shift, torch.Tensor) else type(shift).__name__}")
        C.check_device_dtype({"x": x, "shift": shift})
        shift = shift.reshape(bsz, channels)
    if block_hw < 16 or block_hw & (block_hw - 1):
        raise PidrtError(f"block_hw must be a power of two >= 16, got {block_hw}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)  # preserve_format: NCHW stays NCHW, channels_last stays NHWC
    else:
        C.check_out(out, x)
        if out.stride() != x.stride():
            raise PidrtError(f"out must have x's layout (strides {x.stride()}), got {out.stride()}")
    if out.numel() == 0:
        return out
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    for call in jit_calls(x, weight, bias, groups, eps, shift, silu, out, sms, block_hw, tiles):
        call()
    return out


def jit_calls(x: torch.Tensor, weight, bias, groups: int, eps: float, shift, silu: bool, out: torch.Tensor,
              sms: int, block_hw: int = 64, tiles: int | None = None) -> tuple[JitCall, JitCall]:
    """The two launches `group_norm` makes on checked tensors (shift [B, C] or None), for `sms` SMs."""
    bsz, channels, height, width = x.shape
    hw = height * width
    cpg = channels // groups
    gp, cp = _group_block(cpg)
    block_hw = min(block_hw, max(16, TILE // (gp * cp)))  # only groups wider than 128 channels shrink it
    n_gblocks = triton.cdiv(groups, gp)
    chunks = triton.cdiv(hw, block_hw)
    part = torch.empty(bsz, chunks, groups, 2, device=x.device, dtype=torch.float32)
    sx = dict(zip(("sxb", "sxc", "sxhw"), (x.stride(0), x.stride(1), x.stride(3))))
    ss = dict(zip(("sshb", "sshc"), (0, 0) if shift is None else shift.stride()))
    common = dict(HW=hw, cpg=cpg, G=groups, S=chunks, **sx, **ss, GP=gp, CP=cp, BLOCK_HW=block_hw)
    stats = JitCall(_group_norm_stats_kernel, (bsz, n_gblocks, chunks), dict(X=x, Shift=shift, Part=part, **common),
                    num_warps(gp * cp, block_hw), 3)
    if tiles is None:
        # Enough programs for ~4 waves; more chunks per program amortise the partials' merge.
        tiles = max(1, chunks * bsz * n_gblocks // (4 * sms))
    tiles = max(1, min(int(tiles), chunks))
    apply = JitCall(_group_norm_apply_kernel, (bsz, n_gblocks, triton.cdiv(chunks, tiles)),
                    dict(X=x, Shift=shift, W=weight, Bias=bias, Part=part, Out=out, tiles=tiles, eps=float(eps),
                         sob=out.stride(0), soc=out.stride(1), sohw=out.stride(3), BLOCK_S=min(C.next_pow2(chunks), 32),
                         SILU=bool(silu), **common), num_warps(gp * cp, block_hw, per_thread=64), 3)
    return stats, apply
