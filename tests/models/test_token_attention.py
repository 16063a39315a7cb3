"""Cross-attention with a K and a V context (token identities) against the plain UNet and SeFi-IDE's equation."""

from __future__ import annotations

import pytest
import torch

from pidrt.models.attention import LayerContexts, attention_layers, branch_state, install
from pidrt.models.build import build_unet
from pidrt.models.presets import TINY

B = 3
D = TINY.unet.cross_attention_dim


@pytest.fixture(scope="module")
def unet():
    return build_unet(TINY, seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, 8, 8, generator=g), torch.tensor([999, 500, 20]), torch.randn(B, 77, D, generator=g)


def run(unet, inputs, value_context=None, layer_contexts=None):
    state = branch_state(unet)
    state.value_context, state.layer_contexts = value_context, layer_contexts
    try:
        with torch.no_grad():
            return unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    finally:
        state.clear()


@pytest.fixture(scope="module")
def base(unet, inputs):
    """diffusers' AttnProcessor2_0 on the same batch: today's cross-attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        out = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    install(unet)
    return out


def cross_names(unet) -> list[str]:
    return [layer.name for layer in attention_layers(unet) if layer.kind == "cross"]


def test_equal_k_and_v_contexts_are_the_plain_unet_bit_for_bit(unet, inputs, base):
    ctx = inputs[2]
    assert torch.equal(run(unet, inputs), base)
    assert torch.equal(run(unet, inputs, value_context=ctx.clone()), base)  # V = K, another tensor
    # The layer-group form reading, on every layer, the rows K and V already are.
    rows = torch.arange(B)
    per_layer = LayerContexts(ctx.clone(), {n: rows for n in cross_names(unet)}, {n: rows for n in cross_names(unet)})
    assert torch.equal(run(unet, inputs, layer_contexts=per_layer), base)


def test_a_v_context_changes_only_its_element(unet, inputs, base):
    v = inputs[2].clone()
    v[1] = torch.randn(77, D, generator=torch.Generator().manual_seed(5))
    out = run(unet, inputs, value_context=v)
    assert (out[[0, 2]] - base[[0, 2]]).abs().max() < 1e-6
    assert (out[1] - base[1]).abs().max() > 1e-3


def heads_attention(q, k, v, heads):
    """sum over heads of softmax(Q_h K_h^T / sqrt(d)) V_h, concatenated (no shared code with pidrt)."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        outs.append(torch.softmax(q[:, sl] @ k[:, sl].T / d**0.5, dim=-1) @ v[:, sl])
    return torch.cat(outs, dim=1)


def test_disentangled_cross_attention_matches_the_equation(unet):
    """SeFi-IDE (methods.md 4): O = to_out(softmax((X W_q)(c_K W_k)^T / sqrt(d)) (c_V W_v)), with c_K the
    prompt encoded with the stage's K token and c_V with its V token."""
    layer = next(la for la in attention_layers(unet) if la.kind == "cross" and la.channels == 64)
    attn = dict(unet.named_modules())[layer.name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, layer.channels, generator=g)
    c_k, c_v = torch.randn(2, 77, D, generator=g), torch.randn(2, 77, D, generator=g)
    w_q, w_k, w_v = attn.to_q.weight, attn.to_k.weight, attn.to_v.weight
    expected = torch.stack([
        heads_attention(x[b] @ w_q.T, c_k[b] @ w_k.T, c_v[b] @ w_v.T, layer.heads) @ attn.to_out[0].weight.T
        + attn.to_out[0].bias for b in range(2)])
    state = branch_state(unet)
    state.value_context = c_v
    try:
        with torch.no_grad():
            got = attn(x, encoder_hidden_states=c_k)
    finally:
        state.clear()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # The layer-group form: the layer reads the rows its group names in a table of contexts.
    table = torch.cat([c_v, c_k])  # rows 0-1: c_V, rows 2-3: c_K
    state.layer_contexts = LayerContexts(table, {layer.name: torch.tensor([2, 3])}, {layer.name: torch.tensor([0, 1])})
    try:
        with torch.no_grad():
            got = attn(x, encoder_hidden_states=torch.zeros_like(c_k))  # unused on this layer
    finally:
        state.clear()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_self_attention_ignores_the_contexts(unet):
    layer = next(la for la in attention_layers(unet) if la.kind == "self")
    attn = dict(unet.named_modules())[layer.name]
    x = torch.randn(2, 64, layer.channels, generator=torch.Generator().manual_seed(2))
    state = branch_state(unet)
    with torch.no_grad():
        plain = attn(x)
        state.value_context = torch.randn(2, 77, D)
        try:
            assert torch.equal(attn(x), plain)
        finally:
            state.clear()
