"""DDIM inversion and EAA feature recording (methods.md section 3).

The paper's features come from a reconstruction pass: invert the face latent with guidance 1
and the caption as prompt (P_0 -> P_T), then denoise P_T again with the caption and record the
inputs of attn1 and attn2 of every transformer block at every step (2T UNet calls). The cheaper
variant records during the inversion itself (T calls); its step j is matched to the sampling
step that visits the same point of the schedule, i.e. sampling step T-1-j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.models.adapters import EAAAdapter
from pidrt.models.branches import project_eaa
from pidrt.models.conditions import StepKV
from pidrt.runtime.edits import is_inpainting_unet, repaint_everything
from pidrt.runtime.pipeline import Pipeline
from pidrt.runtime.schedulers import DDIM, DDIMInverse

RecordFrom = Literal["reconstruction", "inversion"]


@dataclass
class Inversion:
    latent_t: torch.Tensor  # P_T
    features: list[dict[str, torch.Tensor]]  # per sampling step: layer name -> X [B, s, C]
    unet_calls: int


def _run(pipe: Pipeline, sched, x, ctx, record: bool, on_call: Callable[[], None] | None):
    steps = []
    state = pipe.state
    # An inpainting UNet records in its text-to-image mode (nothing to keep).
    extra = repaint_everything(pipe, x.shape[0], *x.shape[2:]) if is_inpainting_unet(pipe) else None
    for i, t in enumerate(sched.timesteps):
        state.record = {} if record else None
        x_in = sched.scale_model_input(x, i)
        try:
            eps = pipe.unet(x_in if extra is None else torch.cat([x_in, extra], dim=1), t, ctx)
        finally:
            captured, state.record = state.record, None
        if record:
            steps.append({name: xs[0] for name, xs in captured.items()})
        x = sched.step(eps, i, x)
        if on_call is not None:
            on_call()
    return x, steps


def invert_and_record(pipe: Pipeline, latents: torch.Tensor, caption: str, steps: int,
                      record_from: RecordFrom = "reconstruction",
                      on_call: Callable[[], None] | None = None) -> Inversion:
    """DDIM-invert `latents` [B, 4, h, w] with guidance 1 and record the EAA features."""
    if record_from not in ("reconstruction", "inversion"):
        raise PidrtError(f"record_from must be 'reconstruction' or 'inversion'; got {record_from!r}")
    config = pipe.models.preset.scheduler
    ctx = pipe.encode_text([caption] * latents.shape[0])
    pipe.state.clear()
    x_t, inv_feats = _run(pipe, DDIMInverse(config, steps), latents.to(pipe.device, pipe.dtype), ctx,
                          record_from == "inversion", on_call)
    if record_from == "inversion":
        return Inversion(x_t, inv_feats[::-1], steps)
    _, rec_feats = _run(pipe, DDIM(config, steps), x_t, ctx, True, on_call)
    return Inversion(x_t, rec_feats, 2 * steps)


def ddim_invert(pipe: Pipeline, latents: torch.Tensor, prompts: Sequence[str], steps: int,
                on_call: Callable[[], None] | None = None) -> torch.Tensor:
    """x_0 -> x_T by DDIM inversion with guidance 1, one prompt per latent, no recording: T UNet calls."""
    if len(prompts) != latents.shape[0]:
        raise PidrtError(f"{len(prompts)} prompts for {latents.shape[0]} latents")
    ctx = pipe.encode_text(list(prompts))
    pipe.state.clear()
    x_t, _ = _run(pipe, DDIMInverse(pipe.models.preset.scheduler, steps), latents.to(pipe.device, pipe.dtype), ctx,
                  False, on_call)
    return x_t


def eaa_features(adapter: EAAAdapter, pipe: Pipeline, inversion: Inversion, element: int = 0) -> list[StepKV]:
    """Project one element's recorded features into the per-step K/V that generations consume."""
    return [
        project_eaa(adapter, pipe.layers, {name: feats[element] for name, feats in step.items()})
        for step in inversion.features
    ]
