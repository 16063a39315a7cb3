"""Run the torch `Pipeline` with its UNet, text encoder and VAE calls going through runners.

`Pipeline.generate` fills `self.state` (a `BranchState`: per-layer payloads and per-element
scales) and then calls `self.unet(x, t, ctx)`; `RunnerPipeline` overrides that method (and
`encode_text`, `decode`, `encode_image`) so every call is served by a runner while the torch
code keeps doing what it owns: scheduling, CFG batching, building identity payloads.
`state_feed` is the conversion from the state to the UNet graph's named inputs.

The hook this relies on is that `generate` only reaches the models through those four methods.
A leaner deployment (no torch UNet in memory) needs the payload builders to read only the attn2
projections they use; see docs/engines.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pidrt.engines.runners import Runners
from pidrt.export.inputs import unet_feed
from pidrt.export.specs import ModelSpec
from pidrt.models.attention import BranchState
from pidrt.models.build import Models
from pidrt.models.retouch import LayerTap
from pidrt.runtime.pipeline import Pipeline


def state_feed(spec: ModelSpec, state: BranchState, sample: torch.Tensor, timestep, ctx: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """The UNet graph's named inputs for one call, from the pipeline's current `BranchState`."""
    return unet_feed(spec, sample, timestep, ctx, state.scale, state.layers, state.swap, state.maps)


class RunnerPipeline(Pipeline):
    """A `Pipeline` whose model calls go through `runners`; a missing runner falls back to torch."""

    def __init__(self, models: Models, runners: Runners, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(models, device, dtype)
        self.runners = runners

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t, ctx: torch.Tensor) -> torch.Tensor:
        # EAA enrollment records every layer's input (state.record), the retouch's recorded layout
        # path taps layers (LayerTap); graphs do not output those, so such calls stay on torch.
        if self.runners.unet is None or self.state.record is not None or any(
                isinstance(e, LayerTap) for e in self.state.swap.values()):
            return super().unet(x, t, ctx)
        t = torch.as_tensor(t, device=self.device).expand(x.shape[0])
        return self.runners.unet(x, t, ctx, self.state.scale, payloads=self.state.layers, swap=self.state.swap,
                                 maps=self.state.maps)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.runners.text_encoder is None:
            return super().encode_text(prompts)
        ids = self.models.tokenizer(list(prompts)).to(self.device)
        return self.runners.text_encoder(ids).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.runners.vae_decoder is None:
            return super().decode(latents)
        return self.runners.vae_decoder(latents)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.runners.vae_encoder is None:
            return super().encode_image(images)
        return self.runners.vae_encoder(images.to(self.device, self.dtype)).to(self.dtype)
