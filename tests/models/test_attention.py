"""The identity processors against the papers' equations, the base UNet, and diffusers' IP-Adapter."""

from __future__ import annotations

import pytest
import torch

from pidrt.models.adapters import EAAAdapter, IPAdapterWeights, SCAAdapter, layer_tokens
from pidrt.models.attention import attention_layers, branch_state, install
from pidrt.models.branches import IPIdentity, SCAIdentity, eaa_payloads, few_token_payloads, project_eaa
from pidrt.models.build import build_unet
from pidrt.models.presets import TINY

B = 3


@pytest.fixture(scope="module")
def unet():
    return build_unet(TINY, seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 20])
    ctx = torch.randn(B, 77, TINY.unet.cross_attention_dim, generator=g)
    return sample, t, ctx


def run(unet, inputs, payloads=None, scale=None):
    state = branch_state(unet)
    state.layers = payloads or {}
    state.scale = scale
    try:
        with torch.no_grad():
            return unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    finally:
        state.clear()


def sca_identities(layers, residual="pre_out", seeds=(1, 2)):
    d = TINY.unet.cross_attention_dim
    out = []
    for seed in seeds:
        adapter = SCAAdapter.random(layers, d, seed=seed, residual=residual)
        w = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(seed))
        out.append(SCAIdentity(adapter, adapter.mapping(w)[0]))
    return out


@pytest.fixture(scope="module")
def base(unet, inputs):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        out = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    install(unet)
    return out


def test_no_payload_and_zero_scale_equal_base_exactly(unet, inputs, base):
    layers = attention_layers(unet)
    assert torch.equal(run(unet, inputs), base)
    ids = sca_identities(layers)
    for folded in (True, False):
        payloads = few_token_payloads(unet, layers, [ids[0], ids[1], ids[0]], folded=folded)
        assert torch.equal(run(unet, inputs, payloads, torch.zeros(B)), base)


@pytest.mark.parametrize("residual", ["pre_out", "post_out"])
def test_sca_matches_paper_transcription(unet, residual):
    """Z + lambda * softmax(Q'K'^T/sqrt(d)) V' with Q' = Z W'_q, K' = c W'_k, V' = c W'_v (methods.md 1);
    post_out: Z_out + lambda * (SCA(Z_out) W'_o + b'_o) with Z_out = to_out(Z)."""
    layers = attention_layers(unet)
    layer = next(l for l in layers if l.kind == "cross" and l.channels == 64)
    attn = dict(unet.named_modules())[layer.name]
    (ident,) = sca_identities(layers, residual, seeds=(3,))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, layer.channels, generator=g)
    ctx = torch.randn(1, 77, TINY.unet.cross_attention_dim, generator=g)
    lam = 0.4

    def heads_attn(q, k, v):
        h, d = layer.heads, layer.channels // layer.heads
        outs = []
        for i in range(h):
            sl = slice(i * d, (i + 1) * d)
            p = torch.softmax(q[:, sl] @ k[:, sl].T / d**0.5, dim=-1)
            outs.append(p @ v[:, sl])
        return torch.cat(outs, dim=1)

    z = heads_attn(x[0] @ attn.to_q.weight.T, ctx[0] @ attn.to_k.weight.T, ctx[0] @ attn.to_v.weight.T)
    w = ident.adapter.layers[layer.index]
    q_in = z if residual == "pre_out" else attn.to_out[0](z)
    sca = heads_attn(q_in @ w["to_q.weight"].T, ident.tokens @ w["to_k.weight"].T, ident.tokens @ w["to_v.weight"].T)
    if residual == "pre_out":
        expected = attn.to_out[0](z + lam * sca)
    else:
        expected = q_in + lam * (sca @ w["to_out.weight"].T + w["to_out.bias"])

    state = branch_state(unet)
    for folded in (False, True):
        state.layers = few_token_payloads(unet, layers, [ident], folded=folded)
        state.scale = torch.tensor([lam])
        with torch.no_grad():
            got = attn(x, encoder_hidden_states=ctx)[0]
        state.clear()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual", ["pre_out", "post_out"])
def test_sca_folded_equals_unfolded_whole_unet(unet, inputs, residual):
    layers = attention_layers(unet)
    ids = sca_identities(layers, residual)
    items = [ids[0], None, ids[1]]
    scale = torch.tensor([0.7, 0.0, 1.0])
    unfolded = run(unet, inputs, few_token_payloads(unet, layers, items, folded=False), scale)
    folded = run(unet, inputs, few_token_payloads(unet, layers, items, folded=True), scale)
    assert (folded - unfolded).abs().max() < 1e-5


def test_mixed_batch_equals_per_identity_runs(unet, inputs):
    layers = attention_layers(unet)
    ids = sca_identities(layers)
    items, scale = [ids[0], None, ids[1]], torch.tensor([0.6, 0.0, 0.9])
    mixed = run(unet, inputs, few_token_payloads(unet, layers, items), scale)
    for b in range(B):
        single = tuple(t[b : b + 1] for t in inputs)
        alone = run(unet, single, few_token_payloads(unet, layers, [items[b]]), scale[b : b + 1]) if items[b] else run(unet, single)
        torch.testing.assert_close(mixed[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_ip_adapter_equals_diffusers_processor(unet, inputs):
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    layers = attention_layers(unet)
    d = TINY.unet.cross_attention_dim
    adapter = IPAdapterWeights.random(layers, d, seed=5, embeddings_dim=48)
    embeds = torch.randn(B, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = adapter.image_proj(embeds)
    scale = 0.8

    procs = {}
    for layer in layers:
        key = layer.name + ".processor"
        if layer.kind == "self":
            procs[key] = AttnProcessor2_0()
            continue
        proc = IPAdapterAttnProcessor2_0(layer.channels, d, num_tokens=(adapter.n_tokens,), scale=scale)
        proc.to_k_ip[0].weight.data.copy_(adapter.layers[layer.index]["to_k_ip.weight"])
        proc.to_v_ip[0].weight.data.copy_(adapter.layers[layer.index]["to_v_ip.weight"])
        procs[key] = proc
    unet.set_attn_processor(procs)
    with torch.no_grad():
        theirs = unet(*inputs[:2], encoder_hidden_states=(inputs[2], [tokens])).sample
    install(unet)

    items = [IPIdentity(adapter, tokens[b]) for b in range(B)]
    for folded in (False, True):
        ours = run(unet, inputs, few_token_payloads(unet, layers, items, folded=folded), torch.full((B,), scale))
        assert (ours - theirs).abs().max() < 1e-5


def test_eaa_matches_paper_transcription(unet):
    """O' = O + sigma * softmax(Q (F W_k)^T / sqrt(d)) (F W_v), cross after aggregating s -> s_c."""
    layers = attention_layers(unet)
    adapter = EAAAdapter.random(layers, latent_size=8, n_levels=4, s_c=16, seed=3)
    modules = dict(unet.named_modules())
    g = torch.Generator().manual_seed(4)
    for layer in (next(l for l in layers if l.kind == k and l.name.startswith("up_blocks.1")) for k in ("self", "cross")):
        attn = modules[layer.name]
        s = layer_tokens(layer.name, latent_size=8, n_levels=4)
        x = torch.randn(2, s, layer.channels, generator=g)
        ctx = x if layer.kind == "self" else torch.randn(2, 77, TINY.unet.cross_attention_dim, generator=g)
        feats = torch.randn(s, layer.channels, generator=g)
        kv = project_eaa(adapter, [layer], {layer.name: feats})
        w = adapter.layers[layer.index]
        ref_in = feats if layer.kind == "self" else w["agg.weight"] @ feats + w["agg.bias"][:, None]
        sigma = torch.tensor([0.0, 0.8])
        with torch.no_grad():
            q = attn.to_q(x)
            base = torch.nn.functional.scaled_dot_product_attention(
                *(t.view(2, -1, 8, layer.channels // 8).transpose(1, 2) for t in (q, attn.to_k(ctx), attn.to_v(ctx)))
            ).transpose(1, 2).reshape(2, s, -1)
            extra = torch.nn.functional.scaled_dot_product_attention(
                *(t.view(2, -1, 8, layer.channels // 8).transpose(1, 2)
                  for t in (q, (ref_in @ w["to_k.weight"].T).expand(2, -1, -1), (ref_in @ w["to_v.weight"].T).expand(2, -1, -1)))
            ).transpose(1, 2).reshape(2, s, -1)
            expected = attn.to_out[0](base + sigma.view(-1, 1, 1) * extra)
            state = branch_state(unet)
            state.layers, state.scale = eaa_payloads([layer], [kv, kv]), sigma
            got = attn(x, encoder_hidden_states=None if layer.kind == "self" else ctx)
            state.clear()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # sigma 0 is the plain layer exactly: compared within one batch (another batch size may
        # take another BLAS path, so bit equality across sizes would test the machine)
        plain = attn(x, encoder_hidden_states=None if layer.kind == "self" else ctx)
        assert torch.equal(got[:1], plain[:1])


def test_recording_captures_every_layer_input(unet, inputs):
    state = branch_state(unet)
    state.record = {}
    try:
        run(unet, inputs)
        assert len(state.record) == 32
        assert all(len(v) == 1 and v[0].shape[0] == B for v in state.record.values())
    finally:
        state.record = None
