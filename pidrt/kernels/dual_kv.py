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
from pidrt.kernels.aot import JitCall, Launch, cdiv
from pidrt.kernels.reference import dual_kv_reference

__all__ = ["dual_kv_attention", "dual_kv_reference", "jit_call", "plugin_dtypes", "plugin_launch"]


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
    # Input pointers, int32 scalars, output pointer: the order TensorRT's ahead-of-time plugins
    # launch kernels with. The softmax scale is a compile-time constant (one per head dim in SD1.5).
    Q, K1, V1, K2, V2, Sigma,
    sqb, sqh, sqn, sqd,
    sk1b, sk1h, sk1n, sk1d,
    sv1b, sv1h, sv1n, sv1d,
    sk2b, sk2h, sk2n, sk2d,
    sv2b, sv2h, sv2n, sv2d,
    ssig,
    sob, soh, son, sod,
    H, N, M1, M2, D,
    Out,
    QK_SCALE: tl.constexpr,
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
                  M1, offs_d, d_mask, QK_SCALE, BLOCK_M, BLOCK_N, DP, PREC)
    sigma = tl.load(Sigma + b * ssig).to(tl.float32)
    if sigma != 0.0:
        out2 = _attend(q, K2 + b * sk2b + h * sk2h, V2 + b * sv2b + h * sv2h, sk2n, sk2d, sv2n, sv2d,
                       M2, offs_d, d_mask, QK_SCALE, BLOCK_M, BLOCK_N, DP, PREC)
        out = out + sigma * out2
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _config(dp: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim and dtype.

    The largest tiles that ptxas (sm_90a) fits in registers without spilling, and in the 48 KiB
    of shared memory a launch gets without an opt-in, while a Q tile, the first pass's result and
    the second pass's accumulator are all live, with both the Triton CI installs (3.9) and the one
    on the lent GPU machine (3.6): at dp = 256, (64, 16, 8) is spill-free on 3.9 but spills 32 B
    on 3.6. fp32 runs its dots as IEEE FMA loops with operands staged in shared memory, so it
    gets smaller tiles (the fp16 ones spill up to 7.5 KB and need up to 112 KiB); the two Tritons
    disagree by a few spilled bytes on several candidates, these are clean with both. See
    benchmarks/results/kernel-resources-*.md (``pidrt kernels``); tests/kernels re-checks the
    installed Triton. Speed is not measured yet.
    """
    if dtype == torch.float32:
        if dp <= 64:
            return 32, 32, 4, 2
        if dp <= 128:
            return 16, 32, 8, 2  # (32, 16, 4) spills 12 B on 3.6, (32, 16, 8) 16 B on 3.9
        return 32, 16, 16, 2  # 66 KiB of shared memory: Triton's launcher opts in; no fp32 plugin here
    if dp <= 64:
        return 128, 64, 8, 2
    if dp <= 128:
        return 64, 64, 8, 2
    return 32, 16, 4, 2


def plugin_dtypes(head_dim: int) -> tuple[torch.dtype, ...]:
    """The dtypes the ``pidrt::dual_kv`` plugin offers TensorRT at this head dim: those whose tile fits
    the 48 KiB of shared memory an AOT launch gets (no fp32 tile at d > 128 does without spilling;
    TensorRT then runs that layer's plugin in fp16 inside an fp32 engine)."""
    return (torch.float16, torch.float32) if head_dim <= 128 else (torch.float16,)


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

    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise PidrtError(f"{name} must be a power of two >= 16, got {v}")
    jit_call(q, k1, v1, k2, v2, sig, out, sm_scale, block_m, block_n)()
    return out


def jit_call(q, k1, v1, k2, v2, sigma: torch.Tensor, out: torch.Tensor, sm_scale: float | None = None,
             block_m: int | None = None, block_n: int | None = None) -> JitCall:
    """The launch `dual_kv_attention` makes on checked [B, H, N, d] tensors."""
    bsz, heads, tokens, d = q.shape
    dp = max(16, C.next_pow2(d))
    bm, bn, warps, stages = _config(dp, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    scale = (1.0 / math.sqrt(d)) if sm_scale is None else float(sm_scale)
    names = ["Q", "K1", "V1", "K2", "V2", "Sigma", "sqb", "sqh", "sqn", "sqd", "sk1b", "sk1h", "sk1n", "sk1d",
             "sv1b", "sv1h", "sv1n", "sv1d", "sk2b", "sk2h", "sk2n", "sk2d", "sv2b", "sv2h", "sv2n", "sv2d", "ssig",
             "sob", "soh", "son", "sod", "H", "N", "M1", "M2", "D", "Out"]
    values = [q, k1, v1, k2, v2, sigma, *q.stride(), *k1.stride(), *v1.stride(), *k2.stride(), *v2.stride(),
              sigma.stride(0), *out.stride(), heads, tokens, k1.shape[2], k2.shape[2], d, out]
    args = dict(zip(names, values, strict=True))
    args.update(QK_SCALE=C.LOG2E * scale,  # the kernel uses exp2
                BLOCK_M=bm, BLOCK_N=bn, DP=dp, PREC=C.dot_precision(q.dtype))
    return JitCall(_dual_kv_kernel, (triton.cdiv(tokens, bm), bsz * heads), args, warps, stages)


def plugin_launch(batch, tokens, kv1_tokens, kv2_tokens, heads: int, head_dim: int, dtype: torch.dtype,
                  cdiv=cdiv) -> Launch:
    """The kernel's plan as the TensorRT plugin ``pidrt::dual_kv`` runs it, on [B, N, H*d] tensors.

    Inputs q [B, N, C], k1/v1 [B, M1, C], k2/v2 [B, M2, C] (C = heads * head_dim, heads not yet
    split: the strides do it, so the graph needs no transposes) and sigma [B]; output [B, N, C].
    The batch and the three sequence lengths may be symbolic; heads and head_dim are constants.
    """
    if not 1 <= head_dim <= 256:
        raise PidrtError(f"head dim must be in 1..256, got {head_dim}")
    c = heads * head_dim
    dp = max(16, C.next_pow2(head_dim))
    bm, bn, warps, stages = _config(dp, dtype)
    scalars = {"sqb": tokens * c, "sqh": head_dim, "sqn": c}
    for name, m in (("k1", kv1_tokens), ("v1", kv1_tokens), ("k2", kv2_tokens), ("v2", kv2_tokens)):
        scalars.update({f"s{name}b": m * c, f"s{name}h": head_dim, f"s{name}n": c})
    scalars.update({"sob": tokens * c, "soh": head_dim, "son": c,
                    "H": heads, "N": tokens, "M1": kv1_tokens, "M2": kv2_tokens, "D": head_dim})
    unit = {n: 1 for n in ("sqd", "sk1d", "sv1d", "sk2d", "sv2d", "ssig", "sod")}
    constexprs = {**unit, "QK_SCALE": C.LOG2E / math.sqrt(head_dim), "BLOCK_M": bm, "BLOCK_N": bn, "DP": dp,
                  "PREC": C.dot_precision(dtype)}
    return Launch(_dual_kv_kernel, dtype, ("Q", "K1", "V1", "K2", "V2", "Sigma"), "Out", scalars, constexprs,
                  (cdiv(tokens, bm), batch * heads), warps, stages)
