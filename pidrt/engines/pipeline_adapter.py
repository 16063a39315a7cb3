"""Run the torch `Pipeline` with its UNet, text encoder and VAE calls going through runners.

`Pipeline.generate` fills `self.state` (a `BranchState`: per-layer payloads, per-element
scales, token identities' V context) and then calls `self.unet(x, t, ctx)`; `RunnerPipeline` overrides that method (and
`encode_text`, `decode`, `encode_image`) so every call is served by a runner while the torch
code keeps doing what it owns: scheduling, CFG batching, building identity payloads.
`state_feed` is the conversion from the state to the UNet graph's named inputs.

The hook this relies on is that `generate` only reaches the models through those four methods.
Edits (img2img, inpainting: pidrt.runtime.edits) keep to it: their images are encoded through
`encode_image`, and an inpainting UNet's mask and masked-image channels are part of the sample.
A leaner deployment (no torch UNet in memory) needs the payload builders to read only the attn2
projections they use; see docs/engines.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pidrt.engines.runners import Runners
from pidrt.errors import PidrtError
from pidrt.export.inputs import unet_feed
from pidrt.export.specs import ModelSpec
from pidrt.models.attention import BranchState
from pidrt.models.build import Models
from pidrt.models.retouch import LayerTap
from pidrt.models.tokens import TextKey
from pidrt.runtime.pipeline import Pipeline


def state_feed(spec: ModelSpec, state: BranchState, sample: torch.Tensor, timestep, ctx: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """The UNet graph's named inputs for one call, from the pipeline's current `BranchState`."""
    _check_contexts(state)
    return unet_feed(spec, sample, timestep, ctx, state.scale, state.layers, state.value_context, state.swap,
                     state.maps)


LAYER_CONTEXTS = ("token identities with the 'layers' reading (per-layer contexts) run on the torch backend only; "
                  "exported graphs take one K and one V context (docs/token-identities.md)")


def _check_contexts(state: BranchState) -> None:
    if state.layer_contexts is not None:
        raise PidrtError(LAYER_CONTEXTS)


class RunnerPipeline(Pipeline):
    """A `Pipeline` whose model calls go through `runners`; a missing runner falls back to torch."""

    def __init__(self, models: Models, runners: Runners, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(models, device, dtype)
        self.runners = runners

    @property
    def layer_contexts_unavailable(self) -> str | None:
        """Why UNet calls here cannot take per-layer contexts (a server refuses such requests at
        admission), or None."""
        return None if self.runners.unet is None else LAYER_CONTEXTS

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t, ctx: torch.Tensor) -> torch.Tensor:
        # EAA enrollment records every layer's input (state.record), the retouch's recorded layout
        # path taps layers (LayerTap); graphs do not output those, so such calls stay on torch.
        if self.runners.unet is None or self.state.record is not None or any(
                isinstance(e, LayerTap) for e in self.state.swap.values()):
            return super().unet(x, t, ctx)
        _check_contexts(self.state)
        t = torch.as_tensor(t, device=self.device).expand(x.shape[0])
        return self.runners.unet(x, t, ctx, self.state.scale, payloads=self.state.layers,
                                 value_context=self.state.value_context, swap=self.state.swap, maps=self.state.maps)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[TextKey]) -> torch.Tensor:
        # The text-encoder graph takes token ids, so token texts (learned vectors at a placeholder)
        # are encoded by the torch text encoder; each text is encoded once per generation (or
        # once per cache lifetime), not per step.
        prompts = list(prompts)
        plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        if self.runners.text_encoder is None or not plain:
            return super().encode_text(prompts)
        ids = self.models.tokenizer([prompts[i] for i in plain]).to(self.device)
        out = self.runners.text_encoder(ids).to(self.dtype)
        if len(plain) == len(prompts):
            return out
        tokens = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        rows = torch.empty(len(prompts), *out.shape[1:], dtype=out.dtype, device=out.device)
        rows[plain], rows[tokens] = out, super().encode_text([prompts[i] for i in tokens]).to(out.device)
        return rows

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
