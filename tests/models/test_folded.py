"""The folded branch's cost claim (methods.md section 2), counted by torch's flop counter.

Per layer the folded branch costs 4 N C (8n) flops (two GEMMs through the 8 heads x n tokens)
instead of about 2 N C^2 for the query projection of the unfolded one (+ 2 N C^2 for its own
output projection in `post_out`), i.e. 5x to 40x fewer at n = 4 on SD1.5's widths. The counts
are exact: the difference between a layer call with and without the branch, attention written
as matmuls so that the counter sees it.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch.utils.flop_counter import FlopCounterMode

from pidrt.models.attention import BranchState, FoldedLayer, IdentityAttnProcessor, LayerInfo, UnfoldedBranch
from pidrt.models.folded import fold_branch

HEADS, N_TOKENS, TOKENS, TEXT_DIM = 8, 4, 64, 768  # N cancels out of the ratio: a few tokens do


def layer_flops(channels: int, residual: str) -> dict[str, int]:
    """Flops of one SD1.5-shaped cross-attention layer call: plain, + unfolded branch, + folded branch."""
    torch.manual_seed(0)
    attn = Attention(channels, cross_attention_dim=TEXT_DIM, heads=HEADS, dim_head=channels // HEADS).eval()
    state = BranchState(explicit_attention=True)
    attn.set_processor(IdentityAttnProcessor(LayerInfo("layer", 1, "cross", channels, HEADS), state))
    x, ctx = torch.randn(1, TOKENS, channels), torch.randn(1, 77, TEXT_DIM)
    keys, values = torch.randn(1, N_TOKENS, channels), torch.randn(1, N_TOKENS, channels)
    w_q = torch.randn(1, channels, channels) / channels**0.5
    own = dict(w_o=torch.randn(1, channels, channels) / channels**0.5, b_o=torch.zeros(1, channels))
    unfolded = UnfoldedBranch("z", keys, values, w_q=w_q, **(own if residual == "post_out" else {}))
    if residual == "post_out":
        # post_out queries Z_out = Z W_o + b_o (methods.md 1): W_o W'_q folds into A, b_o W'_q into a score bias.
        to_out = attn.to_out[0]
        branch = fold_branch(to_out.weight.T @ w_q, keys, values, own["w_o"], HEADS, b_q=to_out.bias @ w_q)
    else:
        branch = fold_branch(w_q, keys, values, attn.to_out[0].weight.T, HEADS)
    folded = FoldedLayer("z", branch)
    counts, outputs = {}, {}
    for name, payload in (("plain", None), ("unfolded", unfolded), ("folded", folded)):
        state.layers, state.scale = ({} if payload is None else {"layer": payload}), torch.ones(1)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            outputs[name] = attn(x, encoder_hidden_states=ctx)
        state.clear()
        counts[name] = counter.get_total_flops()
    assert (outputs["folded"] - outputs["unfolded"]).abs().max() < 1e-4  # the same branch
    return counts


@pytest.mark.parametrize("residual", ["pre_out", "post_out"])
@pytest.mark.parametrize("channels", [320, 1280])
def test_folded_branch_flops_match_the_formula(channels, residual):
    counts = layer_flops(channels, residual)
    n, c = TOKENS, channels
    folded = counts["folded"] - counts["plain"]
    unfolded = counts["unfolded"] - counts["plain"]
    assert folded == 4 * n * c * (HEADS * N_TOKENS)
    # query projection, scores and weighted sum over the n tokens, and post_out's own projection
    projections = 2 if residual == "post_out" else 1
    assert unfolded == projections * 2 * n * c * c + 4 * n * N_TOKENS * c
    ratio = unfolded / folded
    assert 5 <= ratio <= 41 and ratio == pytest.approx((projections * 2 * c + 4 * N_TOKENS) / (4 * HEADS * N_TOKENS))
