"""The 9-channel inpainting UNet exported with identity inputs, on onnxruntime against torch."""

from __future__ import annotations

import pytest
import torch

from pidrt.engines.ort_backend import OrtRunner
from pidrt.export.commands import VerifyOptions, reference_output, verify
from pidrt.export.inputs import random_identity_batch, unet_feed
from pidrt.export.manifest import find_graph
from pidrt.export.specs import model_spec
from pidrt.export.testing import tiny_export
from pidrt.models.attention import attention_layers
from pidrt.models.build import build_random
from pidrt.models.presets import SD15_INPAINTING, TINY, TINY_INPAINTING


KINDS = ("unet", "text_encoder", "vae_decoder", "vae_encoder")  # what tests/engines runs a pipeline on


def test_sample_channels_come_from_the_config():
    models = build_random(TINY_INPAINTING, seed=0)
    layers = attention_layers(models.unet)
    for preset, channels in ((TINY_INPAINTING, 9), (SD15_INPAINTING, 9), (TINY, 4)):
        spec = model_spec("unet", preset, layers, "eaa", "float32")
        assert spec.input("sample").dims == ("batch", channels, "height", "width")
    tiny, inpainting = (model_spec("unet", p, layers, "eaa", "float32") for p in (TINY, TINY_INPAINTING))
    assert tiny.profiles == inpainting.profiles and tiny.input("k_1").dims == inpainting.input("k_1").dims


# One UNet export (~20 s on 2 idle cores, more on a shared one).
@pytest.mark.slow
def test_inpainting_unet_graph_matches_torch():
    """[identity 1, identity 2, no identity] with a 9-channel sample (latent, mask, masked-image latent)."""
    folder = tiny_export("sca", kinds=KINDS, preset="tiny-inpainting")
    entry = find_graph(folder, "unet", "sca", "float32")
    assert entry.spec.input("sample").dims == ("batch", 9, "height", "width")
    assert entry.spec.output_names == ["noise_pred"] and entry.spec.outputs[0].dims[1] == 4
    models = build_random(TINY_INPAINTING, seed=0)
    runner = OrtRunner(entry.spec, entry.path, threads=1)
    for side in (8, 16):
        g = torch.Generator().manual_seed(side)
        sample, ctx = torch.randn(3, 9, side, side, generator=g), torch.randn(3, 77, 32, generator=g)
        sample[:, 4] = (sample[:, 4] > 0).float()  # a mask channel
        payloads, scale = random_identity_batch(models.unet, entry.spec, side, side, seed=side)
        feed = unet_feed(entry.spec, sample, torch.tensor([999.0, 500.0, 20.0]), ctx, scale, payloads)
        got = runner.run(feed)["noise_pred"]
        ref = reference_output(models, entry.spec, feed, payloads, scale)
        assert (got - ref).abs().max() < 1e-4
        assert (got[0] - reference_output(models, entry.spec, feed)[0]).abs().max() > 1e-3  # the branch acts
    # `pidrt verify`'s path: the manifest names the preset, whose random weights are rebuilt.
    report = verify(folder, "ort", VerifyOptions(graphs=(entry.name,), backend_options={"threads": 1}))
    assert report["graphs"][entry.name]["max_abs"] < 1e-4
