"""img2img and inpainting in the pipeline's one loop, against diffusers' pipelines step for step."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.models.adapters import EAAAdapter
from pidrt.models.build import build_random
from pidrt.models.presets import TINY_INPAINTING
from pidrt.models.conditions import EAACondition, ScaleSchedule
from pidrt.runtime.edits import Edit, EditPlan, latent_mask, start_step
from pidrt.runtime.inversion import eaa_features, invert_and_record
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig

# diffusers' DPM scheduler trips numpy 2's __array__(copy=) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

CFG = SamplingConfig(steps=4, guidance=5.0, height=64, width=64)
DPM = SamplingConfig(steps=4, guidance=5.0, height=64, width=64, scheduler="dpm++2m")


def image(seed: int) -> torch.Tensor:
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed))


def box_mask(x0=16, y0=8, x1=48, y1=40) -> torch.Tensor:
    m = torch.zeros(64, 64)
    m[y0:y1, x0:x1] = 0.9  # binarised at 0.5: a soft mask repaints the same box
    return m


@pytest.fixture(scope="module")
def inpaint_pipe():
    return Pipeline(build_random(TINY_INPAINTING, seed=0))


@pytest.fixture
def recorded(monkeypatch):
    """Every latent the loop produces, in order (EditPlan.step is the loop's only update)."""
    steps: list[torch.Tensor] = []
    original = EditPlan.step

    def step(self, sched, eps, i, x):
        out = original(self, sched, eps, i, x)
        steps.append(out.clone())
        return out

    monkeypatch.setattr(EditPlan, "step", step)
    return steps


# ----------------------------------------------------------------------------------- diffusers


def diffusers_run(pipe: Pipeline, kind: str, config: SamplingConfig, specs, **kwargs) -> list[torch.Tensor]:
    """diffusers' img2img / inpaint pipeline on the same modules; the latents after every step.

    Prompts go in as pidrt's embeddings (its tokenizer is bypassed), the per-image generators are
    pidrt's seeds, and images go in as pidrt's latents (diffusers passes 4-channel images through),
    so only the pipelines' own logic differs.
    """
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline)

    m, sc = pipe.models, asdict(pipe.models.preset.scheduler)
    scheduler = (DDIMScheduler(**sc, clip_sample=False) if config.scheduler == "ddim" else
                 DPMSolverMultistepScheduler(**{k: v for k, v in sc.items() if k not in ("set_alpha_to_one",)},
                                             algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"))
    cls = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionInpaintPipeline
    sd = cls(vae=m.vae, text_encoder=m.text_encoder, tokenizer=None, unet=m.unet, scheduler=scheduler,
             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ctx = pipe.encode_text([s.negative_prompt for s in specs] + [s.prompt for s in specs])
    seen: list[torch.Tensor] = []

    def on_step_end(_, i, t, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    sd(prompt_embeds=ctx[len(specs):], negative_prompt_embeds=ctx[:len(specs)],
       generator=[torch.Generator().manual_seed(s.seed) for s in specs], num_inference_steps=config.steps,
       guidance_scale=config.guidance, output_type="latent", callback_on_step_end=on_step_end, **kwargs)
    return seen


def x0_of(pipe, images: list[torch.Tensor]) -> torch.Tensor:
    return pipe.encode_image(torch.stack(images))


def assert_steps_match(ours: list[torch.Tensor], theirs: list[torch.Tensor], tol: float = 1e-4) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max() < tol * max(1.0, b.abs().max().item()), f"step {i}"


# ----------------------------------------------------------------------------------- strength


@pytest.mark.parametrize("steps,strength",
                         [(4, 0.5), (10, 0.3), (10, 0.29), (50, 0.8), (7, 1.0), (3, 0.34), (50, 0.02)])
def test_start_step_is_diffusers_rule(tiny_pipe, steps, strength):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    m = tiny_pipe.models
    sd = StableDiffusionImg2ImgPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=None, unet=m.unet,
                                        scheduler=DDIMScheduler(**asdict(m.preset.scheduler), clip_sample=False),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.scheduler.set_timesteps(steps)
    timesteps, runs = sd.get_timesteps(steps, strength, "cpu")
    start = start_step(steps, strength)
    assert steps - start == runs
    from pidrt.runtime.schedulers import DDIM

    assert torch.equal(DDIM(m.preset.scheduler, steps).timesteps[start:], timesteps)


def test_strength_that_runs_no_step_is_refused():
    with pytest.raises(PidrtError, match="runs no step"):
        start_step(10, 0.05)


@pytest.mark.parametrize("config", [CFG, DPM], ids=["ddim", "dpm++2m"])
def test_strength_one_equals_generation(tiny_pipe, config):
    plain = tiny_pipe.generate(config, [ImageSpec("a face", 3), ImageSpec("a dog", 4)])
    edited = tiny_pipe.generate(config, [ImageSpec("a face", 3, edit=Edit(image(0), 1.0)), ImageSpec("a dog", 4)])
    assert torch.equal(plain.latents, edited.latents)


@pytest.mark.parametrize("config,strength", [(CFG, 0.5), (CFG, 0.8), (DPM, 0.6)],
                         ids=["ddim-0.5", "ddim-0.8", "dpm-0.6"])
def test_img2img_matches_diffusers_step_for_step(tiny_pipe, recorded, config, strength):
    images = [image(1), image(2)]
    specs = [ImageSpec("a face", 5, edit=Edit(images[0], strength)),
             ImageSpec("a cat", 6, edit=Edit(images[1], strength))]
    ours = tiny_pipe.generate(config, specs)
    theirs = diffusers_run(tiny_pipe, "img2img", config, specs, image=x0_of(tiny_pipe, images), strength=strength)
    assert len(recorded) == config.steps - start_step(config.steps, strength)  # the skipped steps cost nothing
    assert_steps_match(recorded, theirs)
    assert torch.equal(recorded[-1], ours.latents)


# ----------------------------------------------------------------------------------- inpainting


@pytest.mark.parametrize("config,strength", [(CFG, 1.0), (CFG, 0.75), (DPM, 1.0)], ids=["ddim-1", "ddim-0.75", "dpm-1"])
def test_latent_blend_matches_diffusers_inpaint_on_a_base_unet(tiny_pipe, recorded, config, strength):
    images, masks = [image(3), image(4)], [box_mask(), box_mask(0, 32, 64, 64)]
    specs = [ImageSpec("a face", 7, edit=Edit(images[0], strength, masks[0])),
             ImageSpec("a hat", 8, edit=Edit(images[1], strength, masks[1]))]
    ours = tiny_pipe.generate(config, specs)
    x0 = x0_of(tiny_pipe, images)
    theirs = diffusers_run(tiny_pipe, "inpaint", config, specs, image=x0, masked_image_latents=x0,
                           mask_image=torch.stack(masks)[:, None], strength=strength, height=64, width=64)
    assert_steps_match(recorded, theirs)
    # The known region is the image's own latent, exactly, after the last step.
    keep = torch.stack([latent_mask(Edit(i, 1.0, m).repaint, (8, 8)) for i, m in zip(images, masks)]) == 0
    assert keep.any() and (~keep).any()
    assert torch.equal(torch.where(keep, ours.latents, 0), torch.where(keep, x0, 0))
    base = tiny_pipe.generate(config, [ImageSpec("a face", 7), ImageSpec("a hat", 8)])
    assert ((ours.latents - x0).abs() * ~keep).max() > 1e-2  # the region is repainted...
    assert ((ours.latents - base.latents).abs() * keep).max() > 1e-2  # ...and the rest kept, unlike a generation


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inpainting_unet_matches_diffusers_step_for_step(inpaint_pipe, recorded, strength):
    images, masks = [image(5), image(6)], [box_mask(), box_mask(8, 8, 24, 56)]
    specs = [ImageSpec("a face", 9, edit=Edit(images[0], strength, masks[0])),
             ImageSpec("a smile", 10, edit=Edit(images[1], strength, masks[1]))]
    ours = inpaint_pipe.generate(CFG, specs)
    grey = [i * (m[None] < 0.5) + 0.5 * (m[None] >= 0.5) for i, m in zip(images, masks)]
    theirs = diffusers_run(inpaint_pipe, "inpaint", CFG, specs, image=x0_of(inpaint_pipe, images),
                           masked_image_latents=x0_of(inpaint_pipe, grey), mask_image=torch.stack(masks)[:, None],
                           strength=strength, height=64, width=64)
    assert_steps_match(recorded, theirs)
    assert torch.equal(recorded[-1], ours.latents)


def test_inpainting_unet_generates_from_text(inpaint_pipe):
    """No edit: mask 1 and a blank image, diffusers' 'repaint everything' input."""
    specs = [ImageSpec("a face", 11)]
    ours = inpaint_pipe.generate(CFG, specs)
    blank = torch.full((3, 64, 64), 0.5)
    full = Edit(blank, 1.0, torch.ones(64, 64))
    assert (inpaint_pipe.generate(CFG, [ImageSpec("a face", 11, edit=full)]).latents - ours.latents).abs().max() < 1e-5


# ----------------------------------------------------------------------------------- batches


def mixed_specs():
    return [ImageSpec("plain", 1),
            ImageSpec("img2img", 2, edit=Edit(image(7), 0.5)),
            ImageSpec("inpaint", 3, edit=Edit(image(8), 0.8, box_mask())),
            ImageSpec("inpaint all steps", 4, edit=Edit(image(9), 1.0, box_mask(0, 0, 32, 64)))]


@pytest.mark.parametrize("config", [CFG, DPM], ids=["ddim", "dpm++2m"])
@pytest.mark.parametrize("unet", ["base", "inpainting"])
def test_mixed_batch_equals_each_alone(tiny_pipe, inpaint_pipe, config, unet):
    """Edits of different start steps and plain generations share one batch."""
    pipe = tiny_pipe if unet == "base" else inpaint_pipe
    specs = mixed_specs()
    batch = pipe.generate(config, specs).latents
    for n, spec in enumerate(specs):
        alone = pipe.generate(config, [spec]).latents
        assert (batch[n] - alone[0]).abs().max() < 1e-4, spec.prompt


def eaa_condition(pipe, steps: int, seed: int) -> EAACondition:
    adapter = EAAAdapter.random(pipe.layers, latent_size=8, n_levels=4, s_c=16, seed=seed)
    inv = invert_and_record(pipe, pipe.encode_image(image(seed)[None]), "a face", steps)
    return EAACondition(eaa_features(adapter, pipe, inv), inv.latent_t, "a face", adapter)


def test_eaa_edits_read_the_features_of_the_steps_that_run(tiny_pipe):
    """DDIM img2img reads an EAA identity's cached K/V by step index; the skipped steps' are unused."""
    cond = eaa_condition(tiny_pipe, CFG.steps, 12)
    start = start_step(CFG.steps, 0.5)
    poisoned = EAACondition([{k: (v[0] * float("nan"), v[1]) for k, v in step.items()} if i < start else step
                             for i, step in enumerate(cond.steps)], cond.latents_t, cond.caption, cond.adapter)
    edits = [Edit(image(13), 0.5), Edit(image(14), 0.75, box_mask())]
    out = {}
    for placement in ("resident", "streamed", "recompute"):
        config = SamplingConfig(**{**vars(CFG), "eaa_placement": placement})
        specs = [ImageSpec("p", 1, condition=cond, schedule=ScaleSchedule(0.9), edit=edits[0]),
                 ImageSpec("q", 2, edit=edits[1])]
        out[placement] = tiny_pipe.generate(config, specs).latents
    assert torch.equal(out["resident"], out["streamed"])
    assert (out["recompute"] - out["resident"]).abs().max() < 1e-4
    only = [ImageSpec("p", 1, condition=poisoned, schedule=ScaleSchedule(0.9), edit=edits[0])]
    assert (tiny_pipe.generate(CFG, only).latents[0] - out["resident"][0]).abs().max() < 1e-4  # and no NaN
    off = [ImageSpec("p", 1, edit=edits[0])]
    assert (tiny_pipe.generate(CFG, off).latents[0] - out["resident"][0]).abs().max() > 1e-3


def test_eaa_on_an_inpainting_unet(inpaint_pipe):
    """Enrollment records on the inpainting UNet in its text-to-image mode; inpainting then reads it."""
    cond = eaa_condition(inpaint_pipe, CFG.steps, 15)
    spec = ImageSpec("p", 1, condition=cond, schedule=ScaleSchedule(0.9), edit=Edit(image(16), 1.0, box_mask()))
    with_id = inpaint_pipe.generate(CFG, [spec]).latents
    without = inpaint_pipe.generate(CFG, [ImageSpec("p", 1, edit=spec.edit)]).latents
    assert torch.isfinite(with_id).all() and (with_id - without).abs().max() > 1e-3


def test_bad_edits_are_clear_errors(tiny_pipe):
    for strength in (0, 1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(PidrtError, match="strength"):
            Edit(image(0), strength)
    with pytest.raises(PidrtError, match="mask is 32x64 but the image is 64x64"):
        Edit(image(0), 1.0, torch.ones(64, 32))
    with pytest.raises(PidrtError, match="nothing to repaint"):
        Edit(image(0), 1.0, torch.full((64, 64), 0.4))
    with pytest.raises(PidrtError, match=r"\[3, H, W\]"):
        Edit(torch.rand(4, 64, 64))
    with pytest.raises(PidrtError, match=r"in \[0, 1\]"):
        Edit(image(0) * 2)
    with pytest.raises(PidrtError, match="float tensor"):
        Edit(image(0), 1.0, torch.ones(64, 64, dtype=torch.bool))
    with pytest.raises(PidrtError, match="init image is 64x64 but the generation is 128x64"):
        tiny_pipe.generate(SamplingConfig(steps=2, height=64, width=128), [ImageSpec("p", 1, edit=Edit(image(0)))])
    with pytest.raises(PidrtError, match="runs no step"):
        tiny_pipe.generate(SamplingConfig(steps=2, height=64, width=64), [ImageSpec("p", 1, edit=Edit(image(0), 0.3))])
