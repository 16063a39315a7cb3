"""Plain-torch references for the Triton kernels (no triton import; used by tests and benchmarks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pidrt.models.folded import FoldedBranch, apply_folded

__all__ = ["few_token_reference", "dual_kv_reference", "group_norm_reference"]


def few_token_reference(base: torch.Tensor, x: torch.Tensor, branch: FoldedBranch, scale: torch.Tensor) -> torch.Tensor:
    """base + scale[b] * (softmax_groups(x A[b] + score_bias[b]) B[b] + out_bias[b]).

    The model code's own function, so the kernel is checked against what the models run.
    """
    return apply_folded(base, x, branch, scale)


def dual_kv_reference(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    sigma: torch.Tensor | float,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k1^T s) v1 + sigma[b] * softmax(q k2^T s) v2, s = 1/sqrt(d); [B, H, N, d] layout."""
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.tensor(float(sigma), device=q.device)
    sigma = sigma.to(device=q.device, dtype=q.dtype).reshape(-1, 1, 1, 1)
    out1 = F.scaled_dot_product_attention(q, k1, v1, scale=sm_scale)
    out2 = F.scaled_dot_product_attention(q, k2, v2, scale=sm_scale)
    return out1 + sigma * out2


def group_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float = 1e-5,
    *,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """silu?(group_norm(x + shift, ...)) computed in fp32, returned in x's dtype and layout."""
    h = x.float()
    if shift is not None:
        h = h + shift.float().reshape(x.shape[0], x.shape[1], 1, 1)
    h = F.group_norm(h, groups, None if weight is None else weight.float(), None if bias is None else bias.float(), eps)
    if silu:
        h = F.silu(h)
    return h.to(x.dtype)
