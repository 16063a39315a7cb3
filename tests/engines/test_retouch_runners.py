"""The retouch through runners: one retouch-capable UNet graph serves stage 1, the layout inversion
and stage 2 (edits and subject maps as inputs and outputs), and gives the torch pipeline's images."""

from __future__ import annotations

import pytest
import torch

from pidrt.engines.pipeline_adapter import RunnerPipeline
from pidrt.engines.runners import open_runners
from pidrt.export.testing import tiny_export
from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.models.retouch import MaskConfig, RetouchConfig, swap_layers
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig
from pidrt.runtime.retouch import RetouchOptions, RetouchSpec, reference_path, retouch


SAMPLING = SamplingConfig(steps=4, guidance=5.0, height=64, width=64)
CONFIG = RetouchConfig(layout_steps=1, swap_start=1, reference_start=2, blend_start=2,
                       mask=MaskConfig(threshold=0.3, min_component=0.0))


@pytest.mark.slow  # one more UNet export (~30 s on 2 busy cores), shared with tests/export
@pytest.mark.parametrize("options", [RetouchOptions("inversion", "rows"), RetouchOptions("recorded", "cached")])
def test_retouch_through_ort_equals_torch(options):
    folder = tiny_export("none", retouch_blocks=(10, 16))
    ref_pipe = Pipeline(build_random(TINY, seed=0))
    ort_pipe = RunnerPipeline(build_random(TINY, seed=0), open_runners(folder, "ort", "none", threads=1))
    names = [layer.name for layer in swap_layers(ref_pipe.layers, CONFIG)]
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ref = reference_path(ref_pipe, ref_pipe.encode_image(image), "a photo of a dog", SAMPLING.steps, names)
    specs = [RetouchSpec(ImageSpec("a photo of my dog", 7), ref, (4,)),
             RetouchSpec(ImageSpec("a dog in snow", 8), ref, (2,))]
    want = retouch(ref_pipe, SAMPLING, specs, CONFIG, options)
    got = retouch(ort_pipe, SAMPLING, specs, CONFIG, options)
    assert (got.latents - want.latents).abs().max() < 2e-4
    assert got.unet_calls == want.unet_calls and got.unet_rows == want.unet_rows
