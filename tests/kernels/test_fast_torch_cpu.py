"""The fast torch backend with its Triton kernels in fp32 against the reference: in the
interpreter on CPU, compiled where a GPU is (the `device` fixture).

One interpreted UNet call costs seconds, so this is a single generation step; the EAA kernel
path is covered at the processor level by test_processor_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from pidrt.engines.fast_torch import FastTorchConfig, make_fast
from pidrt.models.adapters import SCAAdapter
from pidrt.models.branches import SCAIdentity
from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.models.conditions import FewTokenCondition, ScaleSchedule
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig


@pytest.mark.usefixtures("ieee_fp32")
def test_fast_pipeline_with_kernels_matches_reference(device):
    ref = Pipeline(build_random(TINY, seed=0), device)
    fast = make_fast(ref, FastTorchConfig(dtype=torch.float32, kernels=True, cuda_graphs=False, channels_last=True))
    adapter = SCAAdapter.random(ref.layers, 32, seed=1)
    w = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(1))
    cond = FewTokenCondition("sca", SCAIdentity(adapter, adapter.mapping(w)[0]),
                             SCAIdentity(adapter, adapter.mapping.unconditional()[0]))
    config = SamplingConfig(steps=1, guidance=5.0, height=64, width=64)
    specs = [ImageSpec("p", 5, condition=cond, schedule=ScaleSchedule(0.8))]
    want = ref.generate(config, specs)
    got = fast.generate(config, specs)
    assert fast.state.fused is not None and ref.state.fused is None
    assert (got.latents - want.latents).abs().max() < 1e-4
    assert (got.images - want.images).abs().max() < 1e-4


@pytest.mark.usefixtures("ieee_fp32")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_norms_match_the_reference_unet(channels_last, device):
    ref = Pipeline(build_random(TINY, seed=0), device)
    config = FastTorchConfig(dtype=torch.float32, kernels=False, fused_norms=True, cuda_graphs=False,
                             channels_last=channels_last)
    fast = make_fast(ref, config)
    report = fast.report()["fused_norms"]
    resnets = [n for n, m in ref.models.unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    transformers = [n for n, m in ref.models.unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    assert report == {"resnets": len(resnets), "transformer_norms": len(transformers), "out_norm": True, "left": {}}
    assert fast.models.unet.state_dict().keys() == ref.models.unet.state_dict().keys()
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, TINY.unet.cross_attention_dim, generator=g)
    x, ctx, t = x.to(device), ctx.to(device), torch.tensor([500, 20], device=device)
    want = ref.unet(x, t, ctx)
    got = fast.unet(x, t, ctx)
    assert (got - want).abs().max() < 1e-4
