"""Test helper: write diffusers SD1.5 modules as an original LDM/CompVis single-file state dict.

This is the reverse of what `pidrt.models.loading` does (it uses diffusers' converters), written
independently from the key names of the original SD1.5 checkpoints, so a round trip through both
checks the loader against the real layout rather than against itself.
"""

from __future__ import annotations

import re

import torch

from pidrt.models.presets import Preset

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_norm_out": "norm_out"}


def _resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{RESNET[layer]}.{tail}"


def unet_key(key: str, preset: Preset) -> str:
    """diffusers UNet2DConditionModel key -> LDM `model.diffusion_model.*` key."""
    per = preset.unet.layers_per_block + 1  # LDM numbers resnets, attentions and samplers in one list
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, param = key.rpartition(".")
    if head in fixed:
        return f"model.diffusion_model.{fixed[head]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + block * per + j
        new = f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        new = f"middle_block.1.{m[1]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = block * per + j
        new = f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        # The upsampler follows the block's last layer: slot 2 after an attention, else slot 1.
        slot = 2 if preset.unet.up_block_types[block].startswith("CrossAttn") else 1
        new = f"output_blocks.{block * per + per - 1}.{slot}.conv.{m[2]}"
    else:
        raise KeyError(f"no LDM name for UNet key {key}")
    return f"model.diffusion_model.{new}"


def vae_key(key: str, preset: Preset) -> str:
    """diffusers AutoencoderKL key -> LDM `first_stage_model.*` key."""
    n_up = len(preset.vae.up_block_types)
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return f"first_stage_model.{key}"
    head, _, param = rest.rpartition(".")
    if head in ("conv_in", "conv_out", "conv_norm_out"):
        new = f"{VAE_TOP.get(head, head)}.{param}"
    elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        # The LDM decoder counts its up blocks from the lowest resolution: reversed.
        block = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
        new = f"{m[1]}.{block}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        new = f"down.{m[1]}.downsample.conv.{m[2]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        new = f"up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        new = f"mid.block_{int(m[1]) + 1}.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        new = f"mid.attn_1.{VAE_ATTN[m[1]]}.{m[2]}"
    else:
        raise KeyError(f"no LDM name for VAE key {key}")
    return f"first_stage_model.{part}.{new}"


def to_ldm(unet, text_encoder, vae, preset: Preset, clip_text_model_prefix: bool = True) -> dict[str, torch.Tensor]:
    """State dict in the SD1.5 single-file layout (v1-5-pruned-emaonly.safetensors names)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        out[unet_key(k, preset)] = v
    for k, v in vae.state_dict().items():
        # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
        if ".attentions." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[vae_key(k, preset)] = v
    clip_prefix = "cond_stage_model.transformer." + ("text_model." if clip_text_model_prefix else "")
    for k, v in text_encoder.state_dict().items():
        out[clip_prefix + k.removeprefix("text_model.")] = v
    # Present in the real files; the loader must tolerate them.
    out[clip_prefix + "embeddings.position_ids"] = torch.arange(preset.text.max_position_embeddings)[None]
    out["alphas_cumprod"] = torch.linspace(1, 0, 10)
    return {k: v.contiguous().clone() for k, v in out.items()}
