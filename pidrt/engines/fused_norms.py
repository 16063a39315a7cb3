"""Runs the UNet's GroupNorms through the fused kernel (`pidrt.kernels.group_norm`), in place.

Three places in diffusers' SD1.5 UNet normalise and then (mostly) apply SiLU:
- every ResnetBlock2D: norm1 -> SiLU, and (+ time embedding) -> norm2 -> SiLU; its forward is
  replaced by `FusedResnetBlock`, which hands the time embedding to the kernel as a shift;
- every Transformer2DModel's input norm (no activation): a `FusedGroupNorm`;
- conv_norm_out -> conv_act at the end: a `FusedGroupNorm` with SiLU, conv_act made identity.
The swapped modules keep the originals' parameters under the same state-dict keys, and a block
whose configuration the fused forward does not reproduce (up/down-sampling resnets, scale-shift
time embeddings, other activations) is left as it is and listed in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class FusedGroupNorm(nn.Module):
    """`norm` (its own weight and bias Parameters) run by the fused kernel, optionally + SiLU."""

    def __init__(self, norm: nn.GroupNorm, silu: bool):
        super().__init__()
        self.num_groups, self.eps, self.silu = norm.num_groups, norm.eps, silu
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        from pidrt.kernels.group_norm import group_norm

        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, shift=shift, silu=self.silu)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, eps={self.eps}, silu={self.silu}"


class FusedResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D forward for the configuration SD1.5 uses (`resnet_fusable`), with
    norm -> SiLU and (+ temb) -> norm -> SiLU each one kernel. Children keep their names."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name in ("time_emb_proj", "conv_shortcut"):  # None when absent: named_children skips them
            setattr(self, name, getattr(block, name, None))
        self.norm1 = FusedGroupNorm(block.norm1, silu=True)
        self.norm2 = FusedGroupNorm(block.norm2, silu=True)
        self.output_scale_factor = block.output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        hidden = self.conv1(self.norm1(input_tensor))
        shift = None
        if self.time_emb_proj is not None and temb is not None:
            shift = self.time_emb_proj(self.nonlinearity(temb))
        hidden = self.conv2(self.dropout(self.norm2(hidden, shift)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / self.output_scale_factor


def resnet_fusable(block: nn.Module) -> str | None:
    """None when FusedResnetBlock reproduces `block`'s forward, else why not."""
    checks = (
        (getattr(block, "upsample", None) is None and getattr(block, "downsample", None) is None, "resamples"),
        (getattr(block, "time_embedding_norm", None) == "default", "time embedding is not a plain add"),
        (not getattr(block, "skip_time_act", False), "skips the time embedding's activation"),
        (isinstance(getattr(block, "nonlinearity", None), nn.SiLU), "activation is not SiLU"),
        (all(isinstance(getattr(block, n, None), nn.GroupNorm) for n in ("norm1", "norm2")), "norms are not GroupNorm"),
    )
    failed = [why for ok, why in checks if not ok]
    return "; ".join(failed) or None


@dataclass(frozen=True)
class NormFusion:
    """What `fuse_group_norms` swapped, and the GroupNorms it left (name: why)."""

    resnets: int
    transformer_norms: int
    out_norm: bool
    left: dict[str, str]

    def as_dict(self) -> dict:
        return {"resnets": self.resnets, "transformer_norms": self.transformer_norms, "out_norm": self.out_norm,
                "left": dict(self.left)}


def fuse_group_norms(unet: nn.Module) -> NormFusion:
    """Swap `unet`'s GroupNorms (a diffusers UNet2DConditionModel) for the fused kernel, in place."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    left: dict[str, str] = {}
    resnets = transformer_norms = 0
    for name, module in list(unet.named_modules()):
        if isinstance(module, ResnetBlock2D):
            why = resnet_fusable(module)
            if why:
                left[name] = why
                continue
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, FusedResnetBlock(module))  # "" is unet itself
            resnets += 1
        elif isinstance(module, Transformer2DModel) and isinstance(getattr(module, "norm", None), nn.GroupNorm):
            module.norm = FusedGroupNorm(module.norm, silu=False)
            transformer_norms += 1
    out_norm = isinstance(getattr(unet, "conv_norm_out", None), nn.GroupNorm) and isinstance(unet.conv_act, nn.SiLU)
    if out_norm:
        unet.conv_norm_out, unet.conv_act = FusedGroupNorm(unet.conv_norm_out, silu=True), nn.Identity()
    for name, module in unet.named_modules():
        if isinstance(module, nn.GroupNorm) and not any(name.startswith(f"{k}.") for k in left):
            left[name] = "not in a ResNet block, transformer input or the output norm"
    return NormFusion(resnets, transformer_norms, out_norm, left)

