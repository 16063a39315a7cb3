"""Build the three SD1.5 models of a preset with seeded random weights (no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pidrt.models.presets import Preset
from pidrt.models.tokenizer import HashTokenizer, Tokenizer


@dataclass
class Models:
    """The modules one pipeline runs. `name` fingerprints the weights' origin for cache keys."""

    preset: Preset
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: Tokenizer
    name: str

    def to(self, device=None, dtype=None) -> "Models":
        for module in (self.unet, self.text_encoder, self.vae):
            # Casting to the dtype a model already has makes diffusers log a warning; skip it.
            same = dtype is None or next(module.parameters()).dtype == dtype
            module.to(device=device) if same else module.to(device=device, dtype=dtype)
        return self


def build_unet(preset: Preset, seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**preset.unet.diffusers_kwargs()).eval().requires_grad_(False)


def build_text_encoder(preset: Preset, seed: int = 0) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 1)
    cfg = CLIPTextConfig(**vars(preset.text))
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def build_vae(preset: Preset, seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 2)
    return AutoencoderKL(**preset.vae.diffusers_kwargs()).eval().requires_grad_(False)


def build_random(preset: Preset, seed: int = 0) -> Models:
    """All models of `preset` with weights drawn from `seed`; same seed, same weights."""
    return Models(
        preset=preset,
        unet=build_unet(preset, seed),
        text_encoder=build_text_encoder(preset, seed),
        vae=build_vae(preset, seed),
        tokenizer=HashTokenizer(preset.text),
        name=f"random:{preset.name}:seed={seed}",
    )
