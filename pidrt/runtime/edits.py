"""Image-to-image and inpainting: what each image of a batch starts from and what it must keep.

An `Edit` on an `ImageSpec` makes that element img2img (an init image and a strength) or
inpainting (plus a mask of the region to repaint). Edits are data per batch element, so one batch
mixes them freely with plain generations of the same size; `EditPlan` is what the pipeline's one
step loop asks of them (start latents, extra UNet channels, the per-step update).

The rules are diffusers' (0.42, StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline):
- Strength s selects the first step: init_timestep = min(int(steps * s), steps), t_start =
  max(steps - init_timestep, 0) (`get_timesteps`). The element starts from
  add_noise(latent(image), noise, timesteps[t_start]) and runs steps t_start..steps-1. At s = 1 it
  starts from the noise itself (the inpainting pipeline's `is_strength_max`), so img2img at
  strength 1 is exactly the plain generation of the same seed. (The img2img pipeline instead still
  mixes sqrt(alpha_bar(t_0)), about 0.07 for SD1.5, of the image into its start at s = 1.)
- A mask is binarised at 0.5 (>= 0.5: repaint, VaeImageProcessor(do_binarize=True)) and resized to
  the latent grid by nearest-neighbour interpolation (`prepare_mask_latents`).
- A 4-channel UNet inpaints by latent blending: after every step the known region is overwritten
  by the image's latent noised to the next step's timestep with the element's own noise (the clean
  latent after the last step): x = (1 - m) * known + m * x. Every identity method works with it.
- A 9-channel inpainting UNet reads cat([x, mask, masked-image latent]) at every step and is not
  blended. The masked image is the image with the repaint region at 0 in [-1, 1] (mid-grey). An
  element without a mask gets mask 1 and the latent of a blank mid-grey image ("repaint
  everything"), which is how an inpainting UNet generates from text alone.
One difference: images are encoded to the latent distribution's mean (diffusers samples it with
the generator), so an edit is deterministic and its seed draws the same noise as a generation.

Different start steps in one batch: the loop begins at the batch's earliest start step; an
element that starts later is held at its noised start latent, and its UNet rows for the earlier
steps are computed and discarded, until its own start step, where it joins (a multistep sampler
restarts its history for that row: `join`). Chosen over putting the start step in the batching
key because it keeps one loop and a constant UNet batch shape (what CUDA-graph buckets and
engine profiles want), and a batch of one strength (the common case) wastes nothing: its loop
begins at that strength's step. The cost of mixing is the held rows, sum(t_start_b - first).
With EAA's `recompute` placement the loop begins at step 0 whatever the strengths, because its
reference rows walk the whole schedule from P_T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from pidrt.errors import PidrtError
from pidrt.runtime.schedulers import add_noise, alphas_cumprod


@dataclass(frozen=True, eq=False)
class Edit:
    """image: [3, H, W] in [0, 1], the generation's size. strength in (0, 1]. mask: [H, W] or
    [1, H, W] in [0, 1], >= 0.5 where the image is repainted; None = img2img of the whole image."""

    image: torch.Tensor
    strength: float = 1.0
    mask: torch.Tensor | None = None

    def __post_init__(self):
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 < s <= 1:
            raise PidrtError(f"strength must be a number in (0, 1]; got {s!r}")
        image = self.image
        if (not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3
                or not image.is_floating_point()):
            raise PidrtError(f"an init image must be a float tensor [3, H, W] in [0, 1]; got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise PidrtError("init image values must be finite and in [0, 1]")
        if self.mask is None:
            return
        mask = self.mask
        if (not isinstance(mask, torch.Tensor) or not mask.is_floating_point() or mask.dim() not in (2, 3)
                or (mask.dim() == 3 and mask.shape[0] != 1)):
            raise PidrtError(f"a mask must be a float tensor [H, W] or [1, H, W] in [0, 1]; got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
            raise PidrtError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                             f"{image.shape[-1]}x{image.shape[-2]}; give a mask of the image's size")
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise PidrtError("mask values must be finite and in [0, 1]")
        if not (mask >= 0.5).any():
            raise PidrtError("the mask has nothing to repaint (no value >= 0.5)")

    @property
    def repaint(self) -> torch.Tensor | None:
        """The binarised mask [1, H, W] (1 = repaint), or None."""
        return None if self.mask is None else (self.mask.reshape(1, *self.mask.shape[-2:]) >= 0.5).float()


def start_step(steps: int, strength: float) -> int:
    """The index of the first step an edit of `strength` runs (diffusers' t_start)."""
    init = min(int(steps * strength), steps)
    if init < 1:
        raise PidrtError(f"strength {strength} runs no step out of {steps}; give strength >= 1/{steps} or more steps")
    return max(steps - init, 0)


def latent_mask(repaint: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A binarised pixel mask [1, H, W] on the latent grid [1, h, w] (nearest, as diffusers)."""
    return F.interpolate(repaint[None], size=size)[0]


def is_inpainting_unet(pipe) -> bool:
    latent_ch, unet_ch = pipe.models.preset.vae.latent_channels, pipe.models.unet.config.in_channels
    if unet_ch not in (latent_ch, 2 * latent_ch + 1):
        raise PidrtError(f"a UNet with {unet_ch} input channels is neither a base ({latent_ch}) nor an "
                         f"inpainting ({2 * latent_ch + 1}) UNet")
    return unet_ch != latent_ch


def repaint_everything(pipe, rows: int, h: int, w: int) -> torch.Tensor:
    """An inpainting UNet's extra channels [rows, 5, h, w] for rows with nothing to keep: mask 1 and
    the latent of a blank mid-grey image (how it generates from text, or records EAA features)."""
    f = pipe.models.preset.latent_scale
    blank = pipe.encode_image(torch.full((1, 3, h * f, w * f), 0.5))
    return torch.cat([torch.ones_like(blank[:, :1]), blank], dim=1).expand(rows, -1, -1, -1)


class EditPlan:
    """The edits of one batch, prepared for the step loop (a batch without edits costs nothing
    on a 4-channel UNet)."""

    def __init__(self, pipe, sched, edits: Sequence[Edit | None], noise: torch.Tensor):
        batch, _, h, w = noise.shape
        f = pipe.models.preset.latent_scale
        for n, e in enumerate(edits):
            if e is not None and tuple(e.image.shape[-2:]) != (h * f, w * f):
                raise PidrtError(f"image {n}: the init image is {e.image.shape[-1]}x{e.image.shape[-2]} but the "
                                 f"generation is {w * f}x{h * f}")
        self.inpainting_unet = is_inpainting_unet(pipe)
        self.starts = [0 if e is None else start_step(sched.steps, e.strength) for e in edits]
        self.first = min(self.starts)
        self.noise, self.x = noise, noise
        self.blend = False
        self._held: dict[int, torch.Tensor] = {}
        self._joining: dict[int, torch.Tensor] = {}
        device, dtype = noise.device, noise.dtype
        masked = [n for n, e in enumerate(edits) if e is not None and e.mask is not None]
        # The image's latent is where a strength < 1 starts and what latent blending keeps.
        with_x0 = [n for n, e in enumerate(edits) if e is not None
                   and (self.starts[n] > 0 or (n in masked and not self.inpainting_unet))]
        pixels = [edits[n].image for n in with_x0]
        if self.inpainting_unet:  # the masked images: the repaint region at mid-grey (0 in [-1, 1])
            pixels += [edits[n].image * (1 - edits[n].repaint) + 0.5 * edits[n].repaint for n in masked]
        latents = pipe.encode_image(torch.stack([p.float() for p in pixels])).to(device, dtype) if pixels else None

        self.mask = torch.ones(batch, 1, h, w, device=device, dtype=dtype)  # 1: repaint
        for n in masked:
            self.mask[n] = latent_mask(edits[n].repaint, (h, w)).to(device, dtype)
        if self.inpainting_unet:
            self.neutral = repaint_everything(pipe, 1, h, w).to(device, dtype)
            self.extra = self.neutral.expand(batch, -1, -1, -1).clone()
            for k, n in enumerate(masked):
                self.extra[n] = torch.cat([self.mask[n], latents[len(with_x0) + k]])
        if with_x0:
            self.x0 = torch.zeros_like(noise)
            self.x0[with_x0] = latents[:len(with_x0)]
            late = [n for n in with_x0 if self.starts[n] > 0]
            if late:
                config, t = pipe.models.preset.scheduler, sched.timesteps[[self.starts[n] for n in late]]
                self.x = noise.clone()
                self.x[late] = add_noise(config, self.x0[late], noise[late], t.to(device))
        if masked and not self.inpainting_unet:
            self.blend = True
            # known(i) = sqrt(a) x0 + sqrt(1 - a) noise at the timestep after step i, as diffusers'
            # add_noise in float32; Python floats, so no host/device copy per step.
            a = alphas_cumprod(pipe.models.preset.scheduler)[sched.timesteps]
            self._sa, self._sb = (a ** 0.5).tolist(), ((1 - a) ** 0.5).tolist()
        if max(self.starts) > 0:
            starts = torch.tensor(self.starts, device=device)
            self._held = {i: (starts > i).reshape(-1, 1, 1, 1) for i in range(max(self.starts))}
            self._joining = {i: starts == i for i in set(self.starts) if i > 0}

    def unet_channels(self, rows: int, cfg: bool) -> torch.Tensor | None:
        """What the UNet reads besides x for each row of its batch ([reference rows] + [negative
        half] + [prompt half]): an inpainting UNet's mask and masked-image latent; None for a base UNet."""
        if not self.inpainting_unet:
            return None
        return torch.cat([self.neutral.expand(rows, -1, -1, -1)] + [self.extra] * (2 if cfg else 1))

    def step(self, sched, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """One sampler step of the batch: elements that start later stay held, rows starting at
        `i` join the sampler's chain, masked regions are blended back (4-channel UNet)."""
        if i in self._joining:
            sched.join(self._joining[i])
        out = sched.step(eps, i, x)
        if self.blend:
            known = self.x0 if i + 1 == len(self._sa) else self.x0 * self._sa[i + 1] + self.noise * self._sb[i + 1]
            out = (1 - self.mask) * known + self.mask * out
        held = self._held.get(i)
        return out if held is None else torch.where(held, x, out)
