"""Token identities through onnxruntime: one exported UNet serves ordinary prompts and token identities."""

from __future__ import annotations

import pytest
import torch

from pidrt.engines.pipeline_adapter import RunnerPipeline
from pidrt.engines.runners import open_runners
from pidrt.errors import PidrtError
from pidrt.export.testing import tiny_export
from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.models.tokens import TokenIdentity
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig

CFG = SamplingConfig(steps=3, guidance=5.0, height=64, width=64)  # DDIM timesteps 667, 334, 1
D = TINY.text.hidden_size


def sefi(stages=2, bounds=(500,), reading="steps", seed=0, **kw) -> TokenIdentity:
    g = torch.Generator().manual_seed(seed)
    return TokenIdentity("<me>", torch.randn(stages, 1, D, generator=g), torch.randn(stages, 1, D, generator=g),
                         reading, bounds, **kw)


@pytest.fixture(scope="module")
def folder():
    return tiny_export("none", kinds=("unet", "text_encoder", "vae_decoder", "vae_encoder"))


def test_mixed_token_batch_through_ort_equals_torch(folder):
    torch_pipe = Pipeline(build_random(TINY, seed=0))
    ort_pipe = RunnerPipeline(build_random(TINY, seed=0), open_runners(folder, "ort", "none", threads=1))
    ti = TokenIdentity.textual_inversion("<me>", torch.randn(2, D, generator=torch.Generator().manual_seed(1)))
    specs = [ImageSpec("a dog", 1), ImageSpec("a photo of <me>", 2, tokens=ti),
             ImageSpec("<me> at the beach", 3, tokens=sefi())]
    ref, got = torch_pipe.generate(CFG, specs), ort_pipe.generate(CFG, specs)
    assert (ref.latents - got.latents).abs().max() < 1e-4
    assert (ref.images - got.images).abs().max() < 1e-4
    plain = ort_pipe.generate(CFG, [ImageSpec("<me> at the beach", 3)])
    assert (got.latents[2] - plain.latents[0]).abs().max() > 1e-3


def test_layer_reading_is_torch_only(folder):
    pipe = RunnerPipeline(build_random(TINY, seed=0), open_runners(folder, "ort", "none", threads=1))
    cross = [layer.name for layer in pipe.layers if layer.kind == "cross"]
    ident = sefi(reading="layers", bounds=(), layer_stages=tuple((n, int(n.startswith("up"))) for n in cross))
    with pytest.raises(PidrtError, match="torch backend only"):
        pipe.generate(CFG, [ImageSpec("a <me>", 1, tokens=ident)])
