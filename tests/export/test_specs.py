"""Export specs and the payload -> graph input conversion (no export needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.export.inputs import random_identity_batch, unet_feed
from pidrt.export.specs import (
    KINDS,
    METHODS,
    ModelSpec,
    Profile,
    SpecOptions,
    default_profiles,
    model_spec,
    unet_spec,
)
from pidrt.models.attention import attention_layers
from pidrt.models.branches import few_token_payloads
from pidrt.models.build import build_unet
from pidrt.models.presets import SD15, TINY


@pytest.fixture(scope="module")
def unet():
    return build_unet(TINY, seed=0)


@pytest.fixture(scope="module")
def layers(unet):
    return attention_layers(unet)


@pytest.mark.parametrize("method,n_identity", [("none", 0), ("sca", 3 * 16), ("ip", 3 * 16), ("eaa", 2 * 32)])
def test_unet_inputs_per_method(layers, method, n_identity):
    spec = unet_spec(TINY, layers, method)
    base = ["sample", "timestep", "encoder_hidden_states", "value_context"] + (["scale"] if method != "none" else [])
    assert spec.input_names[: len(base)] == base
    assert len(spec.inputs) == len(base) + n_identity
    assert spec.input("timestep").dtype == "float32"
    assert spec.input("value_context").dims == spec.input("encoder_hidden_states").dims == ("batch", 77, 32)
    if method in ("sca", "ip"):
        # a_<i> named by the layer's processor index: attn2 layers are the odd ones.
        assert spec.input("a_1").dims == ("batch", 32, 8 * 4) and spec.input("b_1").dims == ("batch", 32, 32)
        assert spec.input("bias_31").dims == ("batch", 128)  # 31: the mid block, last in diffusers order
        assert not any(n.startswith("score") for n in spec.input_names)
    if method == "eaa":
        assert spec.input("k_0").dims == ("batch", "tokens_0", 32)  # attn1 at full latent size
        assert spec.input("k_1").dims == ("batch", 16, 32)  # attn2 after aggregation to s_c


def test_profile_shapes_follow_the_latent(layers):
    spec = unet_spec(TINY, layers, "eaa", "float16")
    shapes = spec.profile_shapes(spec.profiles[0])
    assert shapes["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 16, 16))
    mid = next(i for i, n in spec.identity_layers if n.startswith("mid_block") and n.endswith("attn1"))
    assert shapes[f"k_{mid}"] == ((1, 1, 128), (2, 1, 128), (4, 4, 128))  # 8x8 halved 3 times
    vae = model_spec("vae_encoder", TINY, layers, "none", "float32")
    assert vae.profile_shapes(vae.profiles[0])["images"][2] == (4, 3, 128, 128)
    sd15 = default_profiles(SD15)[0]
    assert sd15.height == (32, 64, 96) and sd15.batch[2] >= 2


def test_bind_checks_shapes_and_names(layers):
    spec = unet_spec(TINY, layers, "sca")
    shapes = spec.shapes_at(3, 16, 8)
    env = spec.bind_inputs(shapes)
    assert (env["batch"], env["height"], env["width"]) == (3, 16, 8)
    assert spec.output_shapes(env) == {"noise_pred": (3, 4, 16, 8)}
    with pytest.raises(PidrtError, match="batch"):
        spec.bind_inputs({**shapes, "scale": (2,)})
    with pytest.raises(PidrtError, match="missing"):
        spec.bind_inputs({k: v for k, v in shapes.items() if k != "a_1"})
    vae = model_spec("vae_encoder", TINY, layers, "none", "float32")
    with pytest.raises(PidrtError, match="multiple of 8"):
        vae.bind_inputs({"images": (1, 3, 60, 64)})


@pytest.mark.parametrize("kind", KINDS)
def test_spec_json_round_trip(layers, kind):
    for method in METHODS if kind == "unet" else ("none",):
        spec = model_spec(kind, TINY, layers, method, "float16", SpecOptions(profiles=(Profile(), Profile((1, 1, 2)))))
        assert ModelSpec.from_json(spec.to_json()) == spec


def test_feed_from_payloads_and_refusals(unet, layers):
    spec = unet_spec(TINY, layers, "sca")
    payloads, scale = random_identity_batch(unet, spec, 8, 8)
    sample, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    feed = unet_feed(spec, sample, 500, ctx, scale, payloads)
    assert set(feed) == set(spec.input_names)
    assert feed["timestep"].tolist() == [500.0] * 3 and feed["timestep"].dtype == torch.float32
    name = spec.identity_layers[0][1]
    assert torch.equal(feed[f"a_{spec.identity_layers[0][0]}"], payloads[name].branch.a)
    # no payloads at all: zeros everywhere (exactly no branch) and scale 0
    empty = unet_feed(spec, sample, 500, ctx)
    assert not empty["scale"].any() and not empty["a_1"].any()

    biased = dict(payloads)
    branch = dataclasses.replace(payloads[name].branch, score_bias=torch.ones_like(payloads[name].branch.score_bias))
    biased[name] = dataclasses.replace(payloads[name], branch=branch)
    with pytest.raises(PidrtError, match="score bias"):
        unet_feed(spec, sample, 500, ctx, scale, biased)
    # A post_out SCA adapter's payloads carry one (b_o W'_q): refused, saying where they do run.
    from pidrt.models.adapters import SCAAdapter
    from pidrt.models.branches import SCAIdentity

    post = SCAAdapter.random(layers, 32, seed=3, residual="post_out")
    post_payloads = few_token_payloads(unet, layers, [SCAIdentity(post, torch.randn(4, 32)), None, None])
    with pytest.raises(PidrtError, match="post_out"):
        unet_feed(spec, sample, 500, ctx, scale, post_payloads)
    unfolded = few_token_payloads(unet, layers, [None, None, None], folded=False)  # {} (no identity)
    assert unet_feed(spec, sample, 500, ctx, scale, unfolded)
    with pytest.raises(PidrtError, match="queries"):
        unet_feed(unet_spec(TINY, layers, "ip"), sample, 500, ctx, scale, payloads)
    with pytest.raises(PidrtError, match="EAA"):
        unet_feed(unet_spec(TINY, layers, "eaa"), sample, 500, ctx, scale, payloads)
    with pytest.raises(PidrtError, match="no identity inputs"):
        unet_feed(unet_spec(TINY, layers, "none"), sample, 500, ctx, scale, payloads)
    assert unet_feed(unet_spec(TINY, layers, "none"), sample, 500, ctx, torch.zeros(3), payloads)


def test_unfolded_payloads_are_refused(unet, layers):
    from pidrt.models.adapters import SCAAdapter
    from pidrt.models.branches import SCAIdentity

    adapter = SCAAdapter.random(layers, 32, seed=1)
    ident = SCAIdentity(adapter, adapter.mapping(torch.randn(1, 18, 512))[0].detach())
    unfolded = few_token_payloads(unet, layers, [ident], folded=False)
    with pytest.raises(PidrtError, match="folded"):
        unet_feed(unet_spec(TINY, layers, "sca"), torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32),
                  torch.ones(1), unfolded)


def test_profile_validation():
    with pytest.raises(PidrtError):
        Profile(batch=(2, 1, 4))
    assert Profile().contains(2, 8, 16) and not Profile().contains(5, 8, 8)


def test_in_batch_eaa_recompute_is_refused(layers):
    from pidrt.models.attention import EAARows

    spec = unet_spec(TINY, layers, "eaa")
    name = spec.identity_layers[0][1]
    rows = {name: EAARows([[1], []], {"w_k": torch.eye(32), "w_v": torch.eye(32)})}
    with pytest.raises(PidrtError, match="cached K/V"):
        unet_feed(spec, torch.randn(2, 4, 8, 8), 1, torch.randn(2, 77, 32), torch.ones(2), rows)
