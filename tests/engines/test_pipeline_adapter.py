"""The torch pipeline with its model calls served by onnxruntime runners gives the same images."""

from __future__ import annotations

import pytest
import torch

from pidrt.engines.pipeline_adapter import RunnerPipeline, state_feed
from pidrt.engines.runners import Runners, open_runners
from pidrt.errors import PidrtError
from pidrt.export.testing import tiny_export
from pidrt.models.adapters import SCAAdapter
from pidrt.models.branches import SCAIdentity
from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.models.conditions import FewTokenCondition, ScaleSchedule
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig

CFG = SamplingConfig(steps=2, guidance=5.0, height=64, width=64)


def sca_condition(layers, seed):
    adapter = SCAAdapter.random(layers, TINY.unet.cross_attention_dim, seed=seed)
    w = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return FewTokenCondition("sca", SCAIdentity(adapter, adapter.mapping(w)[0]),
                                 SCAIdentity(adapter, adapter.mapping.unconditional()[0]))


@pytest.fixture(scope="module")
def folder():
    tiny_export("none")
    return tiny_export("sca", kinds=("unet", "text_encoder", "vae_decoder", "vae_encoder"))


def test_generate_through_ort_equals_torch(folder):
    torch_pipe = Pipeline(build_random(TINY, seed=0))
    ort_pipe = RunnerPipeline(build_random(TINY, seed=0), open_runners(folder, "ort", "sca", threads=1))
    specs = [ImageSpec("a portrait", 1, condition=sca_condition(torch_pipe.layers, 1), schedule=ScaleSchedule(0.8)),
             ImageSpec("a dog", 2),
             ImageSpec("a face", 3, condition=sca_condition(torch_pipe.layers, 2), schedule=ScaleSchedule(1.0, start=1))]
    ref, got = torch_pipe.generate(CFG, specs), ort_pipe.generate(CFG, specs)
    assert (ref.latents - got.latents).abs().max() < 1e-4
    assert (ref.images - got.images).abs().max() < 1e-4
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert (ort_pipe.encode_image(images) - torch_pipe.encode_image(images)).abs().max() < 1e-4


def test_wrong_graph_for_the_batch_is_refused(folder):
    pipe = RunnerPipeline(build_random(TINY, seed=0), Runners(unet=open_runners(folder, "ort", "none", threads=1).unet))
    spec = ImageSpec("p", 1, condition=sca_condition(pipe.layers, 1))
    with pytest.raises(PidrtError, match="no identity inputs"):
        pipe.generate(CFG, [spec])
    pipe.generate(CFG, [ImageSpec("p", 1, condition=spec.condition, schedule=ScaleSchedule(0.0))])  # scale 0 is fine


def test_state_feed_names_every_input(folder):
    pipe = Pipeline(build_random(TINY, seed=0))
    unet = open_runners(folder, "ort", "sca", threads=1).unet
    pipe.state.layers = pipe._few_token_payloads([sca_condition(pipe.layers, 3)], ["cond"], True)
    pipe.state.scale = torch.ones(1)
    try:
        feed = state_feed(unet.spec, pipe.state, torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 32))
    finally:
        pipe.state.clear()
    assert sorted(feed) == sorted(unet.spec.input_names)


def test_eaa_recording_stays_on_torch(folder):
    """Recording needs the UNet's inner activations, which a graph does not return: the runner
    pipeline records on its torch UNet and gives the torch pipeline's features."""
    from pidrt.runtime.inversion import invert_and_record

    pipe = RunnerPipeline(build_random(TINY, seed=0), open_runners(folder, "ort", "none", threads=1))
    latents = pipe.encode_image(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    inv = invert_and_record(pipe, latents, "a photo", 2, "inversion")
    want = invert_and_record(Pipeline(build_random(TINY, seed=0)), latents, "a photo", 2, "inversion")
    assert len(inv.features) == 2 and all(step.keys() == ref.keys() for step, ref in zip(inv.features, want.features))
    for step, ref in zip(inv.features, want.features):
        assert all((step[name] - ref[name]).abs().max() < 1e-5 for name in ref)
    assert (inv.latent_t - want.latent_t).abs().max() < 1e-5
