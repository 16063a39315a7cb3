"""img2img and inpainting through runners: RunnerPipeline inherits the one loop, so edits run on
the exported graphs (VAE encoder included) and give the torch pipeline's images."""

from __future__ import annotations

import pytest
import torch

from pidrt.engines.pipeline_adapter import RunnerPipeline
from pidrt.engines.runners import open_runners
from pidrt.export.testing import tiny_export
from pidrt.models.adapters import SCAAdapter
from pidrt.models.branches import SCAIdentity
from pidrt.models.build import build_random
from pidrt.models.presets import TINY, TINY_INPAINTING
from pidrt.models.conditions import FewTokenCondition, ScaleSchedule
from pidrt.runtime.edits import Edit
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig

CFG = SamplingConfig(steps=3, guidance=5.0, height=64, width=64)
KINDS = ("unet", "text_encoder", "vae_decoder", "vae_encoder")


def sca_condition(layers, seed):
    adapter = SCAAdapter.random(layers, TINY.unet.cross_attention_dim, seed=seed)
    w = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return FewTokenCondition("sca", SCAIdentity(adapter, adapter.mapping(w)[0]),
                                 SCAIdentity(adapter, adapter.mapping.unconditional()[0]))


def specs(layers):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=g)
    mask = torch.zeros(64, 64)
    mask[8:40, 16:48] = 1.0
    return [ImageSpec("a portrait", 1, condition=sca_condition(layers, 1), schedule=ScaleSchedule(0.8),
                      edit=Edit(images[0], 0.6)),
            ImageSpec("a dog", 2),
            ImageSpec("a face", 3, condition=sca_condition(layers, 2), edit=Edit(images[1], 1.0, mask)),
            ImageSpec("a hat", 4, edit=Edit(images[2], 0.7, mask))]


def compare(preset, folder):
    torch_pipe = Pipeline(build_random(preset, seed=0))
    ort_pipe = RunnerPipeline(build_random(preset, seed=0), open_runners(folder, "ort", "sca", threads=1))
    batch = specs(torch_pipe.layers)
    ref, got = torch_pipe.generate(CFG, batch), ort_pipe.generate(CFG, batch)
    assert (ref.latents - got.latents).abs().max() < 1e-4
    assert (ref.images - got.images).abs().max() < 1e-4


def test_edits_on_the_base_graph():
    """Latent-blend inpainting and img2img on the 4-channel SCA graph (the folder tests/engines shares)."""
    compare(TINY, tiny_export("sca", kinds=KINDS))


@pytest.mark.slow  # exports the 9-channel UNet unless tests/export did already
def test_edits_on_the_inpainting_graph():
    compare(TINY_INPAINTING, tiny_export("sca", kinds=KINDS, preset="tiny-inpainting"))
