"""Dual-KV attention: out = softmax(q k1^T s) v1 + sigma[b] * softmax(q k2^T s) v2 (s = 1/sqrt(d)).

Inv-Adapter's EAA (methods.md sec. 3) adds a second attention over cached identity features to
every self- and cross-attention, with the same query. Two SDPA calls read q twice and write and
re-read an intermediate; this flash-attention-style kernel loads each Q tile once, runs the online
softmax (running max m, denominator l, accumulator acc) over KV set 1, then with a second,
independent state over KV set 2, and writes the combined tile once. sigma[b] == 0 (identity off
for that batch element, e.g. the CFG-free branch or early steps) skips the second loop entirely.

Head dims 40/80/160 are padded to the next power of two (64/128/256) with masked loads; sequence
tails (77 text tokens, 256/512 aggregated tokens, odd N) are masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pidrt.errors import PidrtError
from pidrt.kernels import _common as C
from pidrt.kernels.reference import dual_kv_reference

__all__ = ["dual_kv_attention", "dual_kv_reference"]


@triton.jit
def _attend(q, K, V, skn, skd, svn, svd, M, offs_d, d_mask, qk_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
    """softmax(q K^T) V for one Q tile, streaming K/V in BLOCK_N rows (online softmax, base 2)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < M
        # K is loaded as [DP, BLOCK_N] (transposed through its strides) so the dot is q @ k.
        k = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd,
                    mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=PREC) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # Every block has >= 1 valid column (start < M), so m_new is finite and alpha well defined.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc / l_i[:, None]


@triton.jit
def _dual_kv_kernel(
    Q, K1, V1, K2, V2, Sigma, Out,
    sqb, sqh, sqn, sqd,
    sk1b, sk1h, sk1n, sk1d,
    sv1b, sv1h, sv1n, sv1d,
    sk2b, sk2h, sk2n, sk2d,
    sv2b, sv2h, sv2n, sv2d,
    sob, soh, son, sod,
    ssig,
    H, N, M1, M2, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: B*H*N*d exceeds int32 at large batch
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    m_mask = offs_m < N
    d_mask = offs_d < D

    # The Q tile is loaded once and shared by both KV passes.
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    out = _attend(q, K1 + b * sk1b + h * sk1h, V1 + b * sv1b + h * sv1h, sk1n, sk1d, sv1n, sv1d,
                  M1, offs_d, d_mask, qk_scale, BLOCK_M, BLOCK_N, DP, PREC)
    sigma = tl.load(Sigma + b * ssig).to(tl.float32)
    if sigma != 0.0:
        out2 = _attend(q, K2 + b * sk2b + h * sk2h, V2 + b * sv2b + h * sv2h, sk2n, sk2d, sv2n, sv2d,
                       M2, offs_d, d_mask, qk_scale, BLOCK_M, BLOCK_N, DP, PREC)
        out = out + sigma * out2
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _config(dp: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) per padded head dim: keep acc + q tile within registers."""
    if dp <= 64:
        return 128, 64, 4
    if dp <= 128:
        return 128, 64, 8
    return 64, 32, 8


def dual_kv_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    sigma: torch.Tensor | float,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """attn(q, k1, v1) + sigma[b] * attn(q, k2, v2) in one pass, [B, H, N, d] layout (any strides).

    q [B, H, N, d]; k1, v1 [B, H, M1, d]; k2, v2 [B, H, M2, d] (M2 may differ from M1); sigma
    [B], [1], [] or a number. All of one float dtype on one device. d <= 256. ``out`` may be a
    preallocated [B, H, N, d] buffer (e.g. a permuted view of a [B, N, H, d] tensor).
    """
    for name, t in (("q", q), ("k1", k1), ("v1", v1), ("k2", k2), ("v2", v2)):
        C.check_tensor(name, t, 4)
    bsz, heads, tokens, d = q.shape
    m1, m2 = k1.shape[2], k2.shape[2]
    C.check_shape("k1", k1, (bsz, heads, m1, d))
    C.check_shape("v1", v1, (bsz, heads, m1, d))
    C.check_shape("k2", k2, (bsz, heads, m2, d))
    C.check_shape("v2", v2, (bsz, heads, m2, d))
    if m1 < 1 or m2 < 1:
        raise PidrtError(f"both KV sets need at least one token, got M1={m1}, M2={m2}")
    if not 1 <= d <= 256:
        raise PidrtError(f"head dim must be in 1..256, got {d}")
    device = C.check_device_dtype({"q": q, "k1": k1, "v1": v1, "k2": k2, "v2": v2}, q.dtype)
    sig = C.batch_vector("sigma", sigma, bsz, device)
    out = C.check_out(out, q)
    if out.numel() == 0:
        return out

    dp = max(16, C.next_pow2(d))
    bm, bn, warps = _config(dp)
    bm, bn = block_m or bm, block_n or bn
    for name, v in (("block_m", bm), ("block_n", bn)):
        if v < 16 or v & (v - 1):
            raise PidrtError(f"{name} must be a power of two >= 16, got {v}")
    scale = (1.0 / math.sqrt(d)) if sm_scale is None else float(sm_scale)
    grid = (triton.cdiv(tokens, bm), bsz * heads)
    _dual_kv_kernel[grid](
        q, k1, v1, k2, v2, sig, out,
        *q.stride(), *k1.stride(), *v1.stride(), *k2.stride(), *v2.stride(), *out.stride(),
        sig.stride(0),
        heads, tokens, m1, m2, d, scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        BLOCK_M=bm, BLOCK_N=bn, DP=dp, PREC=C.dot_precision(q.dtype),
        num_warps=warps, num_stages=2,
    )
    return out
