"""Fused few-token branch: out = base + scale[b] * (softmax_groups(x A[b] + sb[b]) B[b] + ob[b]).

The folded branch (methods.md sec. 2, ``pidrt.models.folded``) is GEMM -> grouped softmax -> GEMM
with a tiny inner dimension (H*n, e.g. 8*4 = 32), so it is bound by reading x and base and writing
out. One program owns BLOCK_N tokens of one batch element: it computes the scores of all heads in
a single GEMM over C_in (x is read once), does the per-head softmax in registers, then streams
the output in BLOCK_C column chunks, fusing the scaled residual add. The probabilities never touch
memory, and A/B are per batch element, so a batch may mix identities.

Head groups are padded to NP = next_pow2(n) columns (and heads to HP) so the score tile is a
power of two wide; padded columns are -inf before the softmax and their B rows load as zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pidrt.errors import PidrtError
from pidrt.kernels import _common as C
from pidrt.kernels.aot import JitCall, Launch, cdiv
from pidrt.kernels.reference import few_token_reference
from pidrt.models.folded import FoldedBranch

__all__ = ["few_token_branch", "few_token_reference", "jit_call", "plugin_launch", "tiles"]


@triton.jit
def _few_token_kernel(
    # Pointers the TensorRT plugin receives as inputs, then int32 scalars, then the output: the
    # (inputs, extra args, outputs) order TensorRT's ahead-of-time plugins launch kernels with.
    Base, X, A, Bm, OB, Scale, SB,
    N, C_in, C_out, n_tok, H, chunks_per_prog,
    sbsb, sbsn, sbsc,
    sxb, sxn, sxc,
    sab, sak, saj,
    sbb, sbj, sbc,
    sobb, sobc,
    sscale,
    ssbb, ssbj,
    sob, son, soc,
    Out,
    HP: tl.constexpr, NP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    COPY_BASE: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64: b * batch stride overflows int32 at SD sizes
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    c_first = pid_c * chunks_per_prog * BLOCK_C
    base_ptr = Base + b * sbsb + offs_n[:, None] * sbsn
    out_ptr = Out + b * sob + offs_n[:, None] * son
    s = tl.load(Scale + b * sscale).to(tl.float32)

    if s != 0.0:
        # Padded column j = h*NP + i stands for folded column h*n + i (valid when h < H, i < n).
        j = tl.arange(0, HP * NP)
        col_ok = ((j // NP) < H) & ((j % NP) < n_tok)
        col = (j // NP) * n_tok + (j % NP)

        # Scores of all heads in one GEMM over C_in, fp32 accumulation.
        scores = tl.zeros([BLOCK_N, HP * NP], dtype=tl.float32)
        for k0 in range(0, C_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < C_in
            xt = tl.load(X + b * sxb + offs_n[:, None] * sxn + offs_k[None, :] * sxc,
                         mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(A + b * sab + offs_k[:, None] * sak + col[None, :] * saj,
                         mask=k_mask[:, None] & col_ok[None, :], other=0.0)
            scores = tl.dot(xt, at, scores, input_precision=PREC)
        if SB is not None:  # None (a compile-time constant) when the branch has no score bias
            sb = tl.load(SB + b * ssbb + col * ssbj, mask=col_ok, other=0.0).to(tl.float32)
            scores = scores + sb[None, :]
        scores = tl.where(col_ok[None, :], scores, float("-inf"))

        # Softmax within each head's group of NP columns.
        s3 = tl.reshape(scores, (BLOCK_N, HP, NP))
        m = tl.max(s3, axis=2)
        m = tl.where(m == float("-inf"), 0.0, m)  # all-padded head groups: avoid -inf - -inf
        p3 = tl.exp2((s3 - m[:, :, None]) * 1.4426950408889634)
        den = tl.sum(p3, axis=2)
        den = tl.where(den == 0.0, 1.0, den)  # padded groups give p = 0, not 0/0
        p = tl.reshape(p3 / den[:, :, None], (BLOCK_N, HP * NP)).to(X.dtype.element_ty)

        # Stream the output in column chunks: out = base + s * (p @ B + out_bias).
        for t in range(0, chunks_per_prog):
            offs_c = c_first + t * BLOCK_C + tl.arange(0, BLOCK_C)
            c_mask = offs_c < C_out
            io_mask = n_mask[:, None] & c_mask[None, :]
            bt = tl.load(Bm + b * sbb + col[:, None] * sbj + offs_c[None, :] * sbc,
                         mask=col_ok[:, None] & c_mask[None, :], other=0.0)
            o = tl.dot(p, bt, input_precision=PREC)
            ob = tl.load(OB + b * sobb + offs_c * sobc, mask=c_mask, other=0.0).to(tl.float32)
            res = tl.load(base_ptr + offs_c[None, :] * sbsc, mask=io_mask, other=0.0).to(tl.float32)
            res = res + s * (o + ob[None, :])
            tl.store(out_ptr + offs_c[None, :] * soc, res.to(Out.dtype.element_ty), mask=io_mask)
    else:
        # scale 0 (e.g. the first steps of step-blended denoising): the branch is skipped.
        if COPY_BASE:
            for t in range(0, chunks_per_prog):
                offs_c = c_first + t * BLOCK_C + tl.arange(0, BLOCK_C)
                io_mask = n_mask[:, None] & (offs_c < C_out)[None, :]
                res = tl.load(base_ptr + offs_c[None, :] * sbsc, mask=io_mask, other=0.0)
                tl.store(out_ptr + offs_c[None, :] * soc, res.to(Out.dtype.element_ty), mask=io_mask)

def tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(block_n, block_k, block_c, num_warps): the largest that neither spills nor needs over 48 KiB
    of shared memory on sm_90a with Triton 3.6 and 3.9 (`pidrt kernels`, benchmarks/results).

    fp16/bf16: 64 x 64 tiles, 8 warps for every score-tile width (with 4, ptxas spills the 64 x 64
    output chunk plus the probabilities for narrow tiles: HP*NP = 32, 308 bytes). fp32 runs its
    dots as IEEE FMA loops whose operands are staged in shared memory: at 64 x 64 a 16-token head
    group needs 80 KiB and spills; 32 x 32 with 4 warps needs at most 36 KiB.
    """
    if dtype == torch.float32:
        return 32, 32, 32, 4
    return 64, 64, 64, 8


def _score_tile(heads: int, n_tok: int) -> tuple[int, int]:
    """(HP, NP): heads and tokens per head padded to powers of two, HP*NP >= 16 for tl.dot."""
    np_ = C.next_pow2(n_tok)
    hp = C.next_pow2(heads)
    while hp * np_ < 16:  # tl.dot needs every operand dim >= 16
        hp *= 2
    if hp * np_ > 256:
        raise PidrtError(f"heads * pad(n_tokens) = {hp}*{np_} > 256 is more than one score tile holds")
    return hp, np_


def _batched(name: str, t: torch.Tensor, batch: int, rest: tuple) -> torch.Tensor:
    """A branch tensor of shape [B, *rest] or [1, *rest] (shared by the batch) as a [B, ...] view."""
    C.check_tensor(name, t, 1 + len(rest))
    if t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != tuple(rest):
        raise PidrtError(f"{name} has shape {tuple(t.shape)}, expected [{batch} or 1, {', '.join(map(str, rest))}]")
    return t.expand(batch, *rest)


def few_token_branch(
    base: torch.Tensor,
    x: torch.Tensor,
    branch: FoldedBranch,
    scale: torch.Tensor | float,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    block_c: int | None = None,
    split_c: int | None = None,
) -> torch.Tensor:
    """base + scale[b] * (sum_h softmax(x A_h + score_bias_h) B_h + out_bias), one kernel launch.

    base [B, N, C_out], x [B, N, C_in] (same float dtype; any strides), branch tensors with batch
    dim B or 1; scale [B], [1], [] or a number. ``out`` may be preallocated (``out=base`` updates
    in place). A and B are cast to x's dtype (a no-op when the caller already stores them so).
    block_* (default: `tiles`) and split_c (output-column programs per token tile) are tuning knobs.
    """
    C.check_tensor("x", x, 3)
    C.check_tensor("base", base, 3)
    bsz, tokens, c_in = x.shape
    if base.shape[:2] != x.shape[:2]:
        raise PidrtError(f"base {tuple(base.shape)} and x {tuple(x.shape)} differ in batch or token dims")
    c_out = base.shape[2]
    if not isinstance(branch, FoldedBranch):
        raise PidrtError(f"branch must be a FoldedBranch, got {type(branch).__name__}")
    n_tok = int(branch.n_tokens)
    hn = branch.a.shape[-1] if branch.a.dim() == 3 else -1
    if n_tok < 1 or hn < n_tok or hn % n_tok:
        raise PidrtError(f"branch.a last dim ({hn}) must be heads * n_tokens (n_tokens={n_tok})")
    a = _batched("branch.a", branch.a, bsz, (c_in, hn))
    bm = _batched("branch.b", branch.b, bsz, (hn, c_out))
    sb = _batched("branch.score_bias", branch.score_bias, bsz, (hn,))
    ob = _batched("branch.out_bias", branch.out_bias, bsz, (c_out,))
    device = C.check_device_dtype({"x": x, "base": base}, x.dtype)
    C.check_device_dtype({"x": x, "branch.a": a, "branch.b": bm, "branch.score_bias": sb, "branch.out_bias": ob})
    for name, t in (("branch.score_bias", sb), ("branch.out_bias", ob)):
        if not t.is_floating_point():
            raise PidrtError(f"{name} must be a float tensor, got {t.dtype}")
    scale_v = C.batch_vector("scale", scale, bsz, device)
    out = C.check_out(out, base)
    if out.numel() == 0:
        return out
    for name, v in (("block_n", block_n), ("block_k", block_k), ("block_c", block_c)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise PidrtError(f"{name} must be a power of two >= 16, got {v}")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    jit_call(base, x, FoldedBranch(a.to(x.dtype), bm.to(x.dtype), sb, ob, n_tok), scale_v, out, sms,
             block_n, block_k, block_c, split_c)()
    return out


def jit_call(base, x, branch: FoldedBranch, scale: torch.Tensor, out: torch.Tensor, sms: int,
             block_n: int | None = None, block_k: int | None = None, block_c: int | None = None,
             split_c: int | None = None) -> JitCall:
    """The launch `few_token_branch` makes on checked [B, ...] tensors, for a GPU with `sms` SMs."""
    bsz, tokens, _ = x.shape
    n_tok = int(branch.n_tokens)
    hp, np_ = _score_tile(branch.heads, n_tok)
    default_n, default_k, default_c, warps = tiles(x.dtype)
    block_n, block_k, block_c = block_n or default_n, block_k or default_k, block_c or default_c
    n_tiles = triton.cdiv(tokens, block_n)
    c_chunks = triton.cdiv(base.shape[2], block_c)
    if split_c is None:
        # Small N (deep UNet levels: 256 or 64 tokens) gives too few programs to fill the GPU;
        # split the output columns, recomputing the (cheap) scores per split.
        split_c = max(1, min(c_chunks, (2 * sms) // max(1, n_tiles * bsz)))
    split_c = max(1, min(int(split_c), c_chunks))
    chunks_per_prog = triton.cdiv(c_chunks, split_c)
    split_c = triton.cdiv(c_chunks, chunks_per_prog)
    names = ["Base", "X", "A", "Bm", "OB", "Scale", "SB", "N", "C_in", "C_out", "n_tok", "H", "chunks_per_prog",
             "sbsb", "sbsn", "sbsc", "sxb", "sxn", "sxc", "sab", "sak", "saj", "sbb", "sbj", "sbc", "sobb", "sobc",
             "sscale", "ssbb", "ssbj", "sob", "son", "soc", "Out"]
    values = [base, x, branch.a, branch.b, branch.out_bias, scale, branch.score_bias,
              tokens, x.shape[2], base.shape[2], n_tok, branch.heads, chunks_per_prog,
              *base.stride(), *x.stride(), *branch.a.stride(), *branch.b.stride(), *branch.out_bias.stride(),
              scale.stride(0), *branch.score_bias.stride(), *out.stride(), out]
    args = dict(zip(names, values, strict=True))
    args.update(HP=hp, NP=np_, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_C=block_c,
                COPY_BASE=out.data_ptr() != base.data_ptr() or out.stride() != base.stride(),
                PREC=C.dot_precision(x.dtype))
    return JitCall(_few_token_kernel, (n_tiles, split_c, bsz), args, warps, 2)


# An AOT plan cannot look at the token count (it is symbolic until run time), so it fixes how
# many output-column chunks one program streams; 4 x 64 fp16 columns re-read x at most 5 times (1280).
PLUGIN_CHUNKS_PER_PROGRAM = 4


def plugin_launch(batch, tokens, c_in: int, c_out: int, heads: int, n_tokens: int, dtype: torch.dtype,
                  cdiv=cdiv) -> Launch:
    """The kernel's plan on contiguous tensors, as the TensorRT plugin ``pidrt::few_token`` runs it.

    Inputs base [B, N, C_out], x [B, N, C_in], a [B, C_in, H*n], b [B, H*n, C_out], bias [B, C_out],
    scale [B], all of `dtype`; no score bias (zero for every supported adapter, methods.md sec. 2).
    `batch` and `tokens` may be symbolic; the channel counts and heads are build-time constants.
    """
    hp, np_ = _score_tile(heads, n_tokens)
    hn = heads * n_tokens
    block_n, block_k, block_c, warps = tiles(dtype)
    chunks = -(-c_out // block_c)
    per_prog = min(chunks, PLUGIN_CHUNKS_PER_PROGRAM)
    split = -(-chunks // per_prog)
    scalars = {
        "N": tokens, "C_in": c_in, "C_out": c_out, "n_tok": n_tokens, "H": heads, "chunks_per_prog": per_prog,
        "sbsb": tokens * c_out, "sbsn": c_out, "sxb": tokens * c_in, "sxn": c_in,
        "sab": c_in * hn, "sak": hn, "sbb": hn * c_out, "sbj": c_out, "sobb": c_out,
        "sob": tokens * c_out, "son": c_out,
    }
    unit = {n: 1 for n in ("sbsc", "sxc", "saj", "sbc", "sobc", "sscale", "soc")}
    constexprs = {**unit, "SB": None, "ssbb": 0, "ssbj": 0, "HP": hp, "NP": np_, "BLOCK_N": block_n,
                  "BLOCK_K": block_k, "BLOCK_C": block_c, "COPY_BASE": True, "PREC": C.dot_precision(dtype)}
    return Launch(_few_token_kernel, dtype, ("Base", "X", "A", "Bm", "OB", "Scale"), "Out", scalars, constexprs,
                  (cdiv(tokens, block_n), split, batch), warps, 2)
