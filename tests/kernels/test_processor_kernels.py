"""The processor's kernel path against its reference path, on the whole tiny UNet (interpreter)."""

from __future__ import annotations

import torch

from pidrt.kernels.ops import TritonOps
from pidrt.models.adapters import EAAAdapter, SCAAdapter
from pidrt.models.attention import attention_layers, branch_state
from pidrt.models.branches import SCAIdentity, eaa_payloads, few_token_payloads, project_eaa
from pidrt.models.build import build_unet
from pidrt.models.presets import TINY


def test_kernel_path_equals_reference_path():
    unet = build_unet(TINY, seed=0)
    layers = attention_layers(unet)
    state = branch_state(unet)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500, 500])
    sca = SCAAdapter.random(layers, 32, seed=1)
    ident = SCAIdentity(sca, sca.mapping(torch.randn(1, 18, 512, generator=g))[0])
    eaa = EAAAdapter.random(layers, latent_size=8, n_levels=4, s_c=16)
    state.record = {}
    with torch.no_grad():
        unet(x[:1], t[:1], encoder_hidden_states=ctx[:1])
    feats, state.record = {k: v[0][0] for k, v in state.record.items()}, None
    kv = project_eaa(eaa, layers, feats)
    post = SCAAdapter.random(layers, 32, seed=2, residual="post_out")  # a nonzero score bias (b_o W'_q)
    post_ident = SCAIdentity(post, post.mapping(torch.randn(1, 18, 512, generator=g))[0])
    cases = {"sca": few_token_payloads(unet, layers, [ident, None]), "eaa": eaa_payloads(layers, [kv, None]),
             "sca_post_out": few_token_payloads(unet, layers, [post_ident, None])}
    assert any(p.branch.score_bias.abs().max() > 0 for p in cases["sca_post_out"].values())
    for name, payloads in cases.items():
        outs = []
        for kernels in (False, True):
            state.layers, state.scale = payloads, torch.tensor([0.8, 0.0])
            state.fused = TritonOps() if kernels else None
            with torch.no_grad():
                outs.append(unet(x, t, encoder_hidden_states=ctx).sample)
        state.clear()
        state.fused = None
        assert (outs[0] - outs[1]).abs().max() < 1e-4, name
