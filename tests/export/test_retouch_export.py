"""The retouch-capable UNet graph on onnxruntime against the torch reference: edits are inputs."""

from __future__ import annotations

import pytest
import torch

from pidrt.engines.ort_backend import OrtRunner
from pidrt.errors import PidrtError
from pidrt.export.commands import reference_output
from pidrt.export.inputs import random_retouch_edits, unet_feed
from pidrt.export.manifest import find_graph
from pidrt.export.testing import tiny_export
from pidrt.models.attention import branch_state
from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.models.retouch import LayerTap, SwapLayer



@pytest.fixture(scope="module")
def models():
    return build_random(TINY, seed=0)


@pytest.fixture(scope="module")
def entry():
    # One more UNet export (~30 s on 2 busy cores): the tests that need it are slow.
    return find_graph(tiny_export("none", retouch_blocks=(10, 16)), "unet", "none", "float32")


@pytest.fixture(scope="module")
def spec(models):
    from pidrt.export.specs import unet_spec
    from pidrt.models.attention import attention_layers

    return unet_spec(TINY, attention_layers(models.unet), retouch_blocks=(10, 16))


@pytest.mark.slow
@pytest.mark.parametrize("side", [8, 16])
def test_edits_and_maps_match_torch(models, entry, side):
    spec = entry.spec
    runner = OrtRunner(spec, entry.path, threads=1)
    g = torch.Generator().manual_seed(side)
    batch = 4
    sample, ctx = torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, 32, generator=g)
    t = torch.tensor([999.0, 500.0, 20.0, 1.0])
    swap, maps = random_retouch_edits(spec, batch, side, side, seed=side)
    feed = unet_feed(spec, sample, t, ctx, swap=swap, maps=maps)
    got = runner.run(feed)
    state = branch_state(models.unet)
    state.swap, state.maps = swap, maps  # the processors read the edits themselves, not the feed
    try:
        with torch.no_grad():
            want = models.unet(sample, t, encoder_hidden_states=ctx).sample
    finally:
        state.clear()
    assert (reference_output(models, spec, feed) - want).abs().max() < 1e-5  # what `pidrt verify` compares to
    assert (got["noise_pred"] - want).abs().max() < 1e-4
    want_maps = torch.stack([maps.maps[n] for _, n in spec.map_layers], dim=1)
    assert (got["subject_maps"] - want_maps).abs().max() < 1e-5
    # The edits act; without any the graph is the plain UNet.
    plain = reference_output(models, spec, unet_feed(spec, sample, t, ctx))
    assert (want - plain).abs().max() > 1e-3
    assert (runner.run(unet_feed(spec, sample, t, ctx))["noise_pred"] - plain).abs().max() < 1e-4


@pytest.mark.slow
def test_verify_exercises_random_edits(models, entry):
    from pidrt.export.commands import VerifyOptions, verify

    report = verify(entry.dir, "ort", VerifyOptions(graphs=(entry.name,), backend_options={"threads": 1}), models)
    assert report["graphs"][entry.name]["max_abs"] < 1e-4


def test_spec_names_the_edited_and_mapped_layers(spec):
    assert spec.name == "unet_none_retouch_fp32" and spec.output_names == ["noise_pred", "subject_maps"]
    assert [name.split(".transformer")[0] for _, name in spec.retouch_layers] == [
        f"up_blocks.{b}.attentions.{a}" for b in (2, 3) for a in range(3)]
    assert len(spec.map_layers) == 5  # every cross layer at 16 x 16 tokens for 512 px: down 2 + up 3
    assert spec.input("swap_kv_source").dims == ("batch", 6) and spec.input("swap_kv_source").dtype == "int32"
    assert {"blend_mask_0", "blend_mask_1", "map_weights"} <= set(spec.input_names)
    from pidrt.export.specs import ModelSpec

    assert ModelSpec.from_json(spec.to_json()) == spec


def test_no_edits_feed_own_rows_and_full_masks(spec):
    feed = unet_feed(spec, torch.zeros(3, 4, 8, 8), 10, torch.zeros(3, 77, 32))
    assert feed["swap_kv_source"].tolist() == [[r] * 6 for r in range(3)]
    assert (feed["blend_mask_0"] == 1).all() and not feed["map_weights"].any()
    assert sorted(feed) == sorted(spec.input_names)


def test_feed_refuses_what_the_graph_cannot_express(models, spec):
    sample, ctx = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    with pytest.raises(PidrtError, match="not exported to edit"):
        unet_feed(spec, sample, 10, ctx, swap={layer: SwapLayer(torch.arange(2), torch.arange(2))})
    name = spec.retouch_layers[0][1]
    with pytest.raises(PidrtError, match="taps"):
        unet_feed(spec, sample, 10, ctx, swap={name: LayerTap()})
    with pytest.raises(PidrtError, match="cached K/V slot"):
        unet_feed(spec, sample, 10, ctx, swap={name: SwapLayer(torch.tensor([0, 3]), torch.arange(2))})
    two = [SwapLayer(torch.arange(2), torch.arange(2), torch.full((2, 64), v)) for v in (0.5, 0.7)]
    same_level = [n for _, n in spec.retouch_layers if n.startswith("up_blocks.3")][:2]
    with pytest.raises(PidrtError, match="one mask per level"):
        unet_feed(spec, sample, 10, ctx, swap=dict(zip(same_level, two)))
    from pidrt.export.specs import unet_spec
    from pidrt.models.attention import attention_layers

    plain = unet_spec(TINY, attention_layers(models.unet))
    with pytest.raises(PidrtError, match="no retouch inputs"):
        unet_feed(plain, sample, 10, ctx, swap={name: SwapLayer(torch.arange(2), torch.arange(2))})
