"""Lean engine servers: once the graphs serve the models, drop the torch copies.

An ort / trt pipeline runs the UNet, the text encoder and the VAE decoder as engines. What torch
still needs at run time is folding SCA / IP-Adapter identities (`few_token_payloads`): per
cross-attention layer its query projection `to_q` (IP-Adapter queries the layer's own X) and
output projection `to_out[0]`, and the adapter. `projections_only` keeps exactly those, under the
UNet's own module names, so the folding code finds them where it always does. The VAE keeps its
encoder (edits encode their images with it, once per batch, not per step: docs/edits.md); its
decoder goes, the decoder graph serves it.

EAA enrollment records features inside the torch UNet: a lean server refuses it with the reason
(`LEAN_EAA`), and serves EAA identities that a process with the torch UNet wrote into the shared
store (or runs with `BackendOptions(keep_torch_unet=True)`).
"""

from __future__ import annotations

from torch import nn

from pidrt.models.attention import LayerInfo

LEAN_EAA = ("EAA enrollment records features inside the torch UNet, which this lean {backend} server does not keep; "
            "enroll with `pidrt enroll --method eaa --store <this server's store>` (or any torch server on the same "
            "store), or start this server with --keep-torch-unet")


class _Projections(nn.Module):
    """What folding reads of one cross-attention layer: to_q and to_out[0] (the original modules)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.to_q = attn.to_q
        self.to_out = nn.ModuleList([attn.to_out[0]])


class FoldingProjections(nn.Module):
    """A stand-in for the UNet in a lean pipeline: its cross layers' projections, its config."""

    def __init__(self, unet: nn.Module, layers: list[LayerInfo]):
        super().__init__()
        self.config = unet.config  # the pipeline reads in_channels from it
        modules = dict(unet.named_modules())
        for layer in layers:
            if layer.kind != "cross":
                continue
            *path, last = layer.name.split(".")
            parent: nn.Module = self
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(last, _Projections(modules[layer.name]))


def projections_only(pipe) -> None:
    """Replace `pipe.models`' UNet by its folding projections and drop the text encoder and the
    VAE decoder (their graphs serve them). The pipeline keeps its layers and branch state."""
    pipe.models.unet = FoldingProjections(pipe.models.unet, pipe.layers)
    pipe.models.text_encoder = None
    pipe.models.vae.decoder = pipe.models.vae.post_quant_conv = None


def torch_bytes(models) -> int:
    """Bytes of torch parameters and buffers the models hold (what lean servers save)."""
    total = 0
    for module in (models.unet, models.text_encoder, models.vae):
        if isinstance(module, nn.Module):
            total += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return total
