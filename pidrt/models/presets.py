"""Model presets: the exact SD1.5 configurations, and a `tiny` twin with the same block structure.

A preset holds numbers only; `pidrt.models.build` turns it into modules. `tiny` keeps every
structural feature of SD1.5 that the identity branches touch (4 down / 4 up blocks, 16
transformer blocks with attn1 + attn2, 8 heads, a 77-token text context) with small widths, so
the whole pipeline runs on 2 CPU cores in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from pidrt.errors import PidrtError


@dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    )
    cross_attention_dim: int = 768
    # diffusers' historical name: in SD1.5 this is the number of heads (8), not the head dim.
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    center_input_sample: bool = False
    downsample_padding: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    mid_block_scale_factor: float = 1.0

    @property
    def heads(self) -> int:
        return self.attention_head_dim

    def diffusers_kwargs(self) -> dict:
        kw = asdict(self)
        kw["block_out_channels"] = list(self.block_out_channels)
        kw["down_block_types"] = list(self.down_block_types)
        kw["up_block_types"] = list(self.up_block_types)
        return kw


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 512
    scaling_factor: float = 0.18215

    def diffusers_kwargs(self) -> dict:
        kw = asdict(self)
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            kw[key] = list(kw[key])
        return kw


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"


@dataclass(frozen=True)
class Preset:
    name: str
    unet: UNetConfig
    text: TextConfig
    vae: VAEConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # The image side the preset is meant to run at by default (pixels).
    resolution: int = 512

    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def family(self) -> str:
        """The base preset's name ("sd15" for "sd15-inpainting"): sizes a variant shares with it."""
        return self.name.removesuffix(INPAINTING_SUFFIX)


SD15 = Preset(name="sd15", unet=UNetConfig(), text=TextConfig(), vae=VAEConfig(), resolution=512)

TINY = Preset(
    name="tiny",
    unet=UNetConfig(
        sample_size=8,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
    text=TextConfig(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        bos_token_id=1021,
        eos_token_id=1022,
        pad_token_id=1022,
    ),
    vae=VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
    resolution=64,
)

# An SD1.5 inpainting UNet (runwayml/stable-diffusion-inpainting) is SD1.5's with 9 input channels:
# the noisy latent, the mask and the masked image's latent, concatenated in that order (diffusers'
# StableDiffusionInpaintPipeline). Its published unet/config.json differs from SD1.5's in
# in_channels only, and the text encoder, VAE and scheduler configs are SD1.5's.
INPAINTING_CHANNELS = 9
INPAINTING_SUFFIX = "-inpainting"


def inpainting(preset: Preset) -> Preset:
    """`preset`'s inpainting twin: the same models except the UNet's 9 input channels."""
    unet = replace(preset.unet, in_channels=INPAINTING_CHANNELS)
    return replace(preset, name=preset.family + INPAINTING_SUFFIX, unet=unet)


SD15_INPAINTING = inpainting(SD15)
TINY_INPAINTING = inpainting(TINY)

PRESETS: dict[str, Preset] = {p.name: p for p in (SD15, TINY, SD15_INPAINTING, TINY_INPAINTING)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PidrtError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def for_unet_channels(preset: Preset, in_channels: int) -> Preset:
    """The member of `preset`'s family whose UNet takes `in_channels` (a checkpoint's conv_in says
    whether it is an inpainting model); `preset` itself when none does (the config check then
    reports the difference field by field)."""
    if preset.unet.in_channels == in_channels:
        return preset
    base = PRESETS.get(preset.family, preset)
    twin = PRESETS.get(base.name + INPAINTING_SUFFIX) or inpainting(base)
    return next((p for p in (base, twin) if p.unet.in_channels == in_channels), preset)
