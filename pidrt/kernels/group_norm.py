"""GroupNorm with the ResNet block's neighbours fused: out = act(GN(x + shift[b, c]) * w + b).

A candidate for #5's "whatever else the profile shows" (item 3), off by default until measured
(`FastTorchConfig.fused_norms`). Why it may pay on a GPU: every SD1.5 ResNet block runs
GroupNorm -> SiLU twice (the second after adding the time embedding), and torch's CUDA GroupNorm
(up to at least 2.11) has no channels_last kernel: it copies an NHWC input to NCHW and returns
NCHW, which the next channels_last convolution copies back. Per call that is the add, the norm's
two passes, the SiLU and two layout copies; here it is two kernels that read x twice (the second
read mostly from L2) and write once, in whichever layout x has.

1. Statistics: one program per (batch element, block of whole groups, chunk of BLOCK_HW pixels)
   writes each group's chunk mean and centred sum of squares (M2) in fp32.
2. Apply: each program first merges its groups' chunk partials (Chan's parallel formula, exact
   and free of the E[x^2] - E[x]^2 cancellation), then normalises `tiles` chunks of pixels.
No atomics: results are deterministic, which CUDA-graph replays of a step rely on for
reproducible images.

Channel blocks hold whole groups (GPB groups of cpg channels, padded to BLOCK_C), so a group
never straddles two programs; columns map to their block-local group through a one-hot matrix,
since cpg (10, 20, 30, 40, 60, 80 in SD1.5) is rarely a power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pidrt.errors import PidrtError
from pidrt.kernels import _common as C
from pidrt.kernels.reference import group_norm_reference

__all__ = ["group_norm", "group_norm_reference"]


@triton.jit
def _columns(cb, C, cpg, GPB: tl.constexpr, GP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel block cb's channel offsets, their mask, and the column -> block-local group one-hot."""
    j = tl.arange(0, BLOCK_C)
    offs_c = cb * GPB * cpg + j
    c_ok = (j < GPB * cpg) & (offs_c < C)
    onehot = ((j // cpg)[:, None] == tl.arange(0, GP)[None, :]) & c_ok[:, None]
    return offs_c, c_ok, onehot


@triton.jit
def _group_norm_stats_kernel(
    X, Shift, Part,
    HW, C, cpg, G, S,
    sxb, sxc, sxhw, sshb, sshc,
    GPB: tl.constexpr, GP: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    s = tl.program_id(2)
    offs_c, c_ok, onehot = _columns(cb, C, cpg, GPB, GP, BLOCK_C)
    offs_hw = s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (offs_hw < HW)[:, None] & c_ok[None, :]
    x = tl.load(X + b * sxb + offs_hw[:, None] * sxhw + offs_c[None, :] * sxc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if Shift is not None:
        shift = tl.load(Shift + b * sshb + offs_c * sshc, mask=c_ok, other=0.0).to(tl.float32)
        x = tl.where(mask, x + shift[None, :], 0.0)  # padding rows stay 0: the sums count them out
    n = (tl.minimum(HW - s * BLOCK_HW, BLOCK_HW) * cpg).to(tl.float32)
    mean = tl.sum(tl.where(onehot, tl.sum(x, axis=0)[:, None], 0.0), axis=0) / n  # [GP]
    col_mean = tl.sum(tl.where(onehot, mean[None, :], 0.0), axis=1)  # [BLOCK_C]
    d = tl.where(mask, x - col_mean[None, :], 0.0)
    m2 = tl.sum(tl.where(onehot, tl.sum(d * d, axis=0)[:, None], 0.0), axis=0)
    gl = tl.arange(0, GP)
    g = cb * GPB + gl
    ptr = Part + ((b * S + s) * G + g) * 2  # [B, S, G, (mean, M2)]
    ok = (gl < GPB) & (g < G)
    tl.store(ptr, mean, mask=ok)
    tl.store(ptr + 1, m2, mask=ok)


@triton.jit
def _group_norm_apply_kernel(
    X, Shift, W, Bias, Part, Out,
    HW, C, cpg, G, S, tiles, eps,
    sxb, sxc, sxhw, sshb, sshc, sob, soc, sohw,
    GPB: tl.constexpr, GP: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, SILU: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    gl = tl.arange(0, GP)
    g = cb * GPB + gl
    g_ok = (gl < GPB) & (g < G)

    # Merge the chunk partials of this block's groups: mean first, then M2 around it.
    total = HW * cpg * 1.0
    mean = tl.zeros([GP], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        n = (tl.minimum(HW - s * BLOCK_HW, BLOCK_HW) * cpg).to(tl.float32)
        ok = (s < S)[:, None] & g_ok[None, :]
        part_mean = tl.load(Part + ((b * S + s[:, None]) * G + g[None, :]) * 2, mask=ok, other=0.0)
        mean += tl.sum(tl.where(ok, n[:, None] * part_mean, 0.0), axis=0)
    mean = mean / total
    m2 = tl.zeros([GP], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        n = (tl.minimum(HW - s * BLOCK_HW, BLOCK_HW) * cpg).to(tl.float32)
        ok = (s < S)[:, None] & g_ok[None, :]
        ptr = Part + ((b * S + s[:, None]) * G + g[None, :]) * 2
        dm = tl.load(ptr, mask=ok, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.where(ok, tl.load(ptr + 1, mask=ok, other=0.0) + n[:, None] * dm * dm, 0.0), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)

    # Per column: y = (x - (mean - shift)) * rstd * w + bias, so the tile loop is load, FMA, store.
    offs_c, c_ok, onehot = _columns(cb, C, cpg, GPB, GP, BLOCK_C)
    col_mean = tl.sum(tl.where(onehot, mean[None, :], 0.0), axis=1)
    scale = tl.sum(tl.where(onehot, rstd[None, :], 0.0), axis=1)
    if Shift is not None:
        col_mean -= tl.load(Shift + b * sshb + offs_c * sshc, mask=c_ok, other=0.0).to(tl.float32)
    if W is not None:
        scale *= tl.load(W + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    shift_out = tl.zeros([BLOCK_C], dtype=tl.float32)
    if Bias is not None:
        shift_out = tl.load(Bias + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    for t in range(0, tiles):
        offs_hw = (tl.program_id(2) * tiles + t) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = (offs_hw < HW)[:, None] & c_ok[None, :]
        x = tl.load(X + b * sxb + offs_hw[:, None] * sxhw + offs_c[None, :] * sxc, mask=mask, other=0.0)
        y = (x.to(tl.float32) - col_mean[None, :]) * scale[None, :] + shift_out[None, :]
        if SILU:
            y = y / (1.0 + tl.exp2(-y * 1.4426950408889634))
        tl.store(Out + b * sob + offs_hw[:, None] * sohw + offs_c[None, :] * soc,
                 y.to(Out.dtype.element_ty), mask=mask)


def _channel_block(cpg: int) -> tuple[int, int]:
    """(BLOCK_C, groups per block): whole groups in 128 columns, or 256 where 128 would waste
    over a quarter (cpg 80: 80 of 128 used, 240 of 256), or one group padded to a power of two."""
    if cpg <= 128 and (128 // cpg) * cpg >= 96:
        return 128, 128 // cpg
    if cpg <= 256:
        return 256, 256 // cpg
    return C.next_pow2(cpg), 1


def num_warps(block_c: int, block_hw: int) -> int:
    """~32 fp32 tile elements per thread: with 64 (4 warps on 64 x 128) ptxas (sm_90a) gives the
    apply kernel 208 registers, with 32 it needs 94, for more resident programs per SM."""
    return min(16, max(4, block_c * block_hw // 1024))


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
    hw = height * width
    if out.numel() == 0:
        return out

    cpg = channels // groups
    block_c, gpb = _channel_block(cpg)
    gp = max(2, C.next_pow2(gpb))
    n_cblocks = triton.cdiv(groups, gpb)
    chunks = triton.cdiv(hw, block_hw)
    part = torch.empty(bsz, chunks, groups, 2, device=device, dtype=torch.float32)
    sx = (x.stride(0), x.stride(1), x.stride(3))
    ss = (0, 0) if shift is None else shift.stride()
    common = dict(GPB=gpb, GP=gp, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=num_warps(block_c, block_hw))
    _group_norm_stats_kernel[(bsz, n_cblocks, chunks)](
        x, shift, part, hw, channels, cpg, groups, chunks, *sx, *ss, **common)
    if tiles is None:
        # Enough programs for ~4 waves; more chunks per program amortise the partials' merge.
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        tiles = max(1, chunks * bsz * n_cblocks // (4 * sms))
    tiles = max(1, min(int(tiles), chunks))
    _group_norm_apply_kernel[(bsz, n_cblocks, triton.cdiv(chunks, tiles))](
        x, shift, weight, bias, part, out, hw, channels, cpg, groups, chunks, tiles, float(eps),
        *sx, *ss, out.stride(0), out.stride(1), out.stride(3),
        BLOCK_S=min(C.next_pow2(chunks), 32), SILU=bool(silu), **common)
    return out
