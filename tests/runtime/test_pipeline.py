"""The torch pipeline: seeds, CFG batching, identities, scale schedules, inversion recording."""

from __future__ import annotations

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.models.adapters import EAAAdapter, SCAAdapter
from pidrt.models.branches import SCAIdentity
from pidrt.models.presets import TINY
from pidrt.models.conditions import EAACondition, FewTokenCondition, ScaleSchedule
from pidrt.runtime.inversion import eaa_features, invert_and_record
from pidrt.runtime.pipeline import ImageSpec, SamplingConfig

CFG = SamplingConfig(steps=3, guidance=5.0, height=64, width=64)


def sca_condition(pipe, seed):
    adapter = SCAAdapter.random(pipe.layers, TINY.unet.cross_attention_dim, seed=seed)
    w = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(seed))
    return FewTokenCondition(
        "sca", SCAIdentity(adapter, adapter.mapping(w)[0]), SCAIdentity(adapter, adapter.mapping.unconditional()[0])
    )


def test_each_image_reproducible_from_its_seed_whatever_the_batch(tiny_pipe):
    alone = tiny_pipe.generate(CFG, [ImageSpec("a portrait", 7)]).images
    batch = tiny_pipe.generate(CFG, [ImageSpec("a dog", 1), ImageSpec("a portrait", 7), ImageSpec("x", 3)]).images
    assert (batch[1] - alone[0]).abs().max() < 1e-4
    assert (batch[0] - alone[0]).abs().max() > 1e-3


def test_mixed_identity_batch_equals_single_runs(tiny_pipe):
    a, b = sca_condition(tiny_pipe, 1), sca_condition(tiny_pipe, 2)
    specs = [ImageSpec("p", 1, condition=a, schedule=ScaleSchedule(0.5)), ImageSpec("p", 2),
             ImageSpec("q", 3, condition=b, schedule=ScaleSchedule(1.0))]
    mixed = tiny_pipe.generate(CFG, specs).images
    for i, spec in enumerate(specs):
        single = tiny_pipe.generate(CFG, [spec]).images
        assert (mixed[i] - single[0]).abs().max() < 1e-4


def test_zero_scale_and_late_start_equal_base_exactly(tiny_pipe):
    cond = sca_condition(tiny_pipe, 1)
    base = tiny_pipe.generate(CFG, [ImageSpec("p", 5)]).images
    off = tiny_pipe.generate(CFG, [ImageSpec("p", 5, condition=cond, schedule=ScaleSchedule(0.0))]).images
    late = tiny_pipe.generate(CFG, [ImageSpec("p", 5, condition=cond, schedule=ScaleSchedule(1.0, start=CFG.steps))]).images
    on = tiny_pipe.generate(CFG, [ImageSpec("p", 5, condition=cond, schedule=ScaleSchedule(1.0))]).images
    assert torch.equal(off, base) and torch.equal(late, base)
    assert (on - base).abs().max() > 1e-4


def test_schedule_blends_steps():
    sched = ScaleSchedule(0.7, start=2, end=4)
    assert [sched.at(i) for i in range(6)] == [0.0, 0.0, 0.7, 0.7, 0.0, 0.0]
    with pytest.raises(PidrtError):
        ScaleSchedule(1.0, start=3, end=1)


def test_folded_and_unfolded_pipelines_agree(tiny_pipe):
    cond = sca_condition(tiny_pipe, 4)
    spec = [ImageSpec("p", 5, condition=cond, schedule=ScaleSchedule(0.8))]
    folded = tiny_pipe.generate(CFG, spec).images
    unfolded = tiny_pipe.generate(SamplingConfig(**{**vars(CFG), "folded": False}), spec).images
    assert (folded - unfolded).abs().max() < 1e-4


@pytest.mark.parametrize("record_from,calls", [("reconstruction", 6), ("inversion", 3)])
def test_inversion_records_every_layer_every_step(tiny_pipe, record_from, calls):
    """The recorded features are the inputs torch hands each attention module (forward pre-hooks),
    step-aligned: the reconstruction pass's call i, or the inversion's call T-1-i; and a
    generation from them is the one that recomputes the reconstruction inside the batch."""
    steps, caption = 3, "a photo of a person"
    unet = tiny_pipe.models.unet
    modules = dict(unet.named_modules())
    seen: list[dict] = []  # per UNet call: layer name -> the attention module's input

    def record(name):
        def hook(module, args, kwargs):
            seen[-1][name] = args[0] if args else kwargs["hidden_states"]
        return hook

    hooks = [unet.register_forward_pre_hook(lambda *a: seen.append({}))]
    hooks += [modules[layer.name].register_forward_pre_hook(record(layer.name), with_kwargs=True)
              for layer in tiny_pipe.layers]
    counted = []
    latents = tiny_pipe.encode_image(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    try:
        inv = invert_and_record(tiny_pipe, latents, caption, steps, record_from, on_call=lambda: counted.append(1))
    finally:
        for h in hooks:
            h.remove()
    assert inv.unet_calls == calls == len(counted) == len(seen)
    assert len(inv.features) == steps and all(len(step) == 32 for step in inv.features)
    calls_of_step = range(steps, 2 * steps) if record_from == "reconstruction" else range(steps - 1, -1, -1)
    for step, call in zip(inv.features, calls_of_step):
        assert step.keys() == seen[call].keys() and all(torch.equal(step[n], seen[call][n]) for n in step)

    adapter = EAAAdapter.random(tiny_pipe.layers, latent_size=8, n_levels=4, s_c=16)
    kv = eaa_features(adapter, tiny_pipe, inv)
    cross = next(l for l in tiny_pipe.layers if l.kind == "cross")
    assert kv[0][cross.name][0].shape == (16, cross.channels)
    cond = EAACondition(kv, inv.latent_t, caption, adapter)
    spec = [ImageSpec("p", 1, condition=cond, schedule=ScaleSchedule(0.8))]
    images = tiny_pipe.generate(CFG, spec).images
    base = tiny_pipe.generate(CFG, [ImageSpec("p", 1)]).images
    assert (images - base).abs().max() > 1e-3  # the features reach the images
    if record_from == "reconstruction":
        recomputed = tiny_pipe.generate(SamplingConfig(**{**vars(CFG), "eaa_placement": "recompute"}), spec).images
        assert (recomputed - images).abs().max() < 1e-4


def test_bad_requests_are_clear_errors(tiny_pipe):
    with pytest.raises(PidrtError, match="steps"):
        tiny_pipe.generate(SamplingConfig(steps=0, height=64, width=64), [ImageSpec("p", 1)])
    with pytest.raises(PidrtError, match="multiple of 8"):
        tiny_pipe.generate(SamplingConfig(steps=2, height=60, width=64), [ImageSpec("p", 1)])
    with pytest.raises(PidrtError, match="nothing to generate"):
        tiny_pipe.generate(CFG, [])
    kv = [{}] * 2
    with pytest.raises(PidrtError, match="recorded for 2 steps"):
        tiny_pipe.generate(CFG, [ImageSpec("p", 1, condition=EAACondition(kv))])
    with pytest.raises(PidrtError, match="one identity method"):
        tiny_pipe.generate(CFG, [ImageSpec("p", 1, condition=EAACondition([{}] * 3)),
                                 ImageSpec("p", 1, condition=sca_condition(tiny_pipe, 1))])


def test_eaa_placements_give_the_same_images(tiny_pipe):
    """resident, streamed and recompute feed the same K/V; cached generation costs T UNet calls."""
    steps = 3
    adapter = EAAAdapter.random(tiny_pipe.layers, latent_size=8, n_levels=4, s_c=16, seed=2)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    conds = []
    for r in range(2):
        inv = invert_and_record(tiny_pipe, tiny_pipe.encode_image(pixels[r:r + 1]), "a face", steps)
        conds.append(EAACondition(eaa_features(adapter, tiny_pipe, inv), inv.latent_t, "a face", adapter))
    specs = [ImageSpec("p", 1, condition=conds[0], schedule=ScaleSchedule(0.9)), ImageSpec("q", 2),
             ImageSpec("r", 3, condition=conds[1], schedule=ScaleSchedule(0.7, start=1))]
    calls = []
    hook = tiny_pipe.models.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        images = {}
        for placement in ("resident", "streamed", "recompute"):
            calls.clear()
            config = SamplingConfig(steps=steps, guidance=5.0, height=64, width=64, eaa_placement=placement)
            images[placement] = tiny_pipe.generate(config, specs).images
            assert len(calls) == steps
    finally:
        hook.remove()
    assert torch.equal(images["resident"], images["streamed"])
    assert (images["recompute"] - images["resident"]).abs().max() < 1e-4
    base = tiny_pipe.generate(SamplingConfig(steps=steps, guidance=5.0, height=64, width=64), [specs[1]]).images
    assert (images["resident"][1] - base[0]).abs().max() < 1e-4
    with pytest.raises(PidrtError, match="ddim"):
        tiny_pipe.generate(SamplingConfig(steps=steps, height=64, width=64, scheduler="dpm++2m"), specs)
