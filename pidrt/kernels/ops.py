"""The Triton kernels behind the processors' `FusedOps` interface (``BranchState.fused``)."""

from __future__ import annotations

import torch

from pidrt.kernels.dual_kv import dual_kv_attention
from pidrt.kernels.few_token import few_token_branch
from pidrt.models.attention import split_heads
from pidrt.models.folded import FoldedBranch


class TritonOps:
    """One kernel launch per layer call for folded SCA / IP-Adapter branches and for EAA."""

    def few_token(self, base: torch.Tensor, x: torch.Tensor, branch: FoldedBranch, scale: torch.Tensor) -> torch.Tensor:
        return few_token_branch(base, x, branch, scale)

    def dual_kv(self, query, key, value, keys2, values2, sigma, heads: int) -> torch.Tensor:
        bsz, tokens, channels = query.shape
        # Written as [B, N, H, d] through a [B, H, N, d] view: the merged-heads result needs no copy.
        out = query.new_empty(bsz, tokens, heads, channels // heads)
        dual_kv_attention(split_heads(query, heads), split_heads(key, heads), split_heads(value, heads),
                          split_heads(keys2, heads), split_heads(values2, heads), sigma, out=out.transpose(1, 2))
        return out.view(bsz, tokens, channels)

    def __repr__(self) -> str:
        return "TritonOps()"
