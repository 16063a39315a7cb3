"""The folded form of a few-token attention branch (methods.md section 2).

A branch whose keys and values come from n fixed tokens (SCA's visual tokens, IP-Adapter's
image tokens) is, per head h, softmax(q_h k_h^T / sqrt(d)) v_h W_o[h rows]. With the tokens fixed
for a request, q_h = x W_q[:, h] folds into A_h = W_q[:, h] k_h^T / sqrt(d) (C x n) and the
values with the output projection into B_h = v_h W_o[h rows] (n x C). The branch becomes
GEMM(x, A) -> softmax over each group of n columns -> GEMM(., B): 5x to 40x fewer flops, and
A, B are per-identity *data*, so one engine serves every identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FoldedBranch:
    """Per batch element: A [B, C, H*n], B [B, H*n, C], score_bias [B, H*n], out_bias [B, C]."""

    a: torch.Tensor
    b: torch.Tensor
    score_bias: torch.Tensor
    out_bias: torch.Tensor
    n_tokens: int

    @property
    def heads(self) -> int:
        return self.a.shape[-1] // self.n_tokens

    def to(self, device=None, dtype=None) -> "FoldedBranch":
        conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return FoldedBranch(conv(self.a), conv(self.b), conv(self.score_bias), conv(self.out_bias), self.n_tokens)


def fold_branch(
    w_q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    w_o: torch.Tensor,
    heads: int,
    b_q: torch.Tensor | None = None,
    b_v: torch.Tensor | None = None,
    b_o: torch.Tensor | None = None,
) -> FoldedBranch:
    """Fold one layer's branch for a batch of token sets.

    w_q: [C_in, C] or [B, C_in, C] query projection in x @ w_q convention (torch Linear weight.T).
    keys, values: [B, n, C] the projected tokens (k = c W_k, v = c W_v).
    w_o: [C, C_out] or [B, C, C_out] the output projection applied after the branch.
    b_q, b_v, b_o: optional biases ([C] or [B, C]; b_o: [C_out] or [B, C_out]).
    """
    bsz, n, c = keys.shape
    d = c // heads
    w_q = w_q.expand(bsz, *w_q.shape[-2:]) if w_q.dim() == 2 else w_q
    w_o = w_o.expand(bsz, *w_o.shape[-2:]) if w_o.dim() == 2 else w_o
    k_h = keys.view(bsz, n, heads, d).permute(0, 2, 1, 3)  # [B, H, n, d]
    v_h = values.view(bsz, n, heads, d).permute(0, 2, 1, 3)
    wq_h = w_q.reshape(bsz, -1, heads, d).permute(0, 2, 1, 3)  # [B, H, C_in, d]
    wo_h = w_o.reshape(bsz, heads, d, -1)  # [B, H, d, C_out]
    scale = d ** -0.5
    a = torch.einsum("bhcd,bhnd->bchn", wq_h, k_h).reshape(bsz, -1, heads * n) * scale
    b = torch.einsum("bhnd,bhdo->bhno", v_h, wo_h).reshape(bsz, heads * n, -1)
    if b_q is not None:
        bq_h = b_q.expand(bsz, c).view(bsz, heads, 1, d)
        score_bias = (bq_h * k_h).sum(-1).reshape(bsz, heads * n) * scale
    else:
        score_bias = keys.new_zeros(bsz, heads * n)
    out_bias = keys.new_zeros(bsz, b.shape[-1])
    if b_v is not None:
        out_bias = out_bias + torch.einsum("bc,bco->bo", b_v.expand(bsz, c), w_o)
    if b_o is not None:
        out_bias = out_bias + b_o.expand(bsz, b.shape[-1])
    return FoldedBranch(a, b, score_bias, out_bias, n)


def folded_attention(x: torch.Tensor, branch: FoldedBranch) -> torch.Tensor:
    """sum_h softmax(x A_h + score_bias_h) B_h + out_bias, for x [B, N, C_in] -> [B, N, C_out]."""
    bsz, tokens, _ = x.shape
    scores = torch.bmm(x, branch.a.to(x.dtype)) + branch.score_bias.to(x.dtype)[:, None, :]
    probs = scores.view(bsz, tokens, branch.heads, branch.n_tokens).softmax(dim=-1)
    out = torch.bmm(probs.view(bsz, tokens, -1), branch.b.to(x.dtype))
    return out + branch.out_bias.to(x.dtype)[:, None, :]


def apply_folded(base: torch.Tensor, x: torch.Tensor, branch: FoldedBranch, scale: torch.Tensor) -> torch.Tensor:
    """base + scale[b] * branch(x): the op the Triton few-token kernel fuses."""
    return base + scale.to(base.dtype).view(-1, 1, 1) * folded_attention(x, branch)


def stack_folded(items: list[FoldedBranch | None]) -> FoldedBranch:
    """Batch single-element branches ([1, ...] each); None elements get zeros (run them at scale 0)."""
    like = next(i for i in items if i is not None)
    if any(i is not None and i.n_tokens != like.n_tokens for i in items):
        raise ValueError("folded branches of one batch need the same token count")
    fields = ("a", "b", "score_bias", "out_bias")
    stacked = {
        f: torch.cat([getattr(i, f) if i is not None else torch.zeros_like(getattr(like, f)) for i in items])
        for f in fields
    }
    return FoldedBranch(**stacked, n_tokens=like.n_tokens)
