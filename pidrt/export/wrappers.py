"""The modules that get traced: each takes exactly its spec's inputs, in order, and returns its output.

`UNetGraph` turns its identity inputs into `BranchState` payloads and calls the unmodified UNet,
so the graph computes what the torch pipeline computes, through the same processor code, while
no identity data ends up in the weights: one graph (and one engine) serves every identity.
The same modules are the `torch` backend's runners (with SDPA attention instead of the explicit
MatMul-Softmax-MatMul the export uses), so the reference and the graph share one definition.
"""

from __future__ import annotations

import torch
from torch import nn

from pidrt.errors import PidrtError
from pidrt.export import retouch_io
from pidrt.export.specs import ModelSpec
from pidrt.models.attention import EAAKV, FoldedLayer, branch_state
from pidrt.models.build import Models
from pidrt.models.folded import FoldedBranch

QUERY = {"sca": "z", "ip": "x"}  # SCA reads the text-attention output Z, IP-Adapter the layer input X


class UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module, spec: ModelSpec, explicit_attention: bool = True):
        super().__init__()
        self.unet = unet
        self.spec = spec
        self.explicit_attention = explicit_attention
        branch_state(unet)  # install the identity processors before tracing

    def payloads(self, feed: dict[str, torch.Tensor]) -> dict:
        spec, out = self.spec, {}
        for index, name in spec.identity_layers:
            if spec.method in QUERY:
                a = feed[f"a_{index}"]
                # score_bias is zero for IP-Adapter and pre_out SCA (inputs.py refuses post_out SCA
                # payloads), so the graph has no input for it; a [1, 1] zero broadcasts and cleanup drops the Add.
                zero = torch.zeros(1, 1, dtype=a.dtype, device=a.device)
                branch = FoldedBranch(a, feed[f"b_{index}"], zero, feed[f"bias_{index}"], spec.n_tokens)
                out[name] = FoldedLayer(QUERY[spec.method], branch)
            else:
                out[name] = EAAKV(feed[f"k_{index}"], feed[f"v_{index}"])
        return out

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        feed = dict(zip(self.spec.input_names, args))
        state = branch_state(self.unet)
        saved = state.explicit_attention, state.fused
        # Triton kernels cannot be traced: the graph carries the plain torch form of the branch,
        # or (spec.plugins) one TensorRT plugin node per layer call.
        state.explicit_attention, state.fused = self.explicit_attention, _plugin_nodes() if self.spec.plugins else None
        state.layers = self.payloads(feed)
        state.scale = feed.get("scale")
        state.value_context = feed.get("value_context")  # absent in graphs exported before it existed
        if self.spec.retouch_layers:
            state.swap, state.maps = retouch_io.graph_payloads(self.spec, feed)
        try:
            noise = self.unet(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"],
                              return_dict=False)[0]
            return (noise, retouch_io.graph_maps(self.spec, state.maps)) if self.spec.retouch_layers else noise
        finally:
            state.clear()
            state.explicit_attention, state.fused = saved


def _plugin_nodes():
    from pidrt.export.plugin_nodes import PluginNodes

    return PluginNodes()


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Eager attention: the TorchScript exporter turns SDPA's is_causal into an fp32 mask,
        # which makes fp16 graphs mix float and half (onnxruntime rejects them). Eager is also
        # the MatMul-Softmax-MatMul form TensorRT fuses. Same math; the model's setting is restored.
        config = self.text_encoder.config
        saved = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            return self.text_encoder(input_ids).last_hidden_state
        finally:
            config._attn_implementation = saved


class VAEDecoderGraph(nn.Module):
    """Pipeline.decode: unscale, decode, map [-1, 1] to [0, 1] (in the graph: one less pass)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latent / self.vae.config.scaling_factor, return_dict=False)[0]
        return ((images + 1) / 2).clamp(0, 1)


class VAEEncoderGraph(nn.Module):
    """Pipeline.encode_image: [0, 1] images -> the latent distribution's mean, scaled."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images * 2 - 1, return_dict=False)[0]
        return dist.mean * self.vae.config.scaling_factor


def graph_module(models: Models, spec: ModelSpec, explicit_attention: bool = True) -> nn.Module:
    """The wrapper that computes `spec` from `models` (no copy: it shares their weights)."""
    if spec.kind == "unet":
        return UNetGraph(models.unet, spec, explicit_attention)
    if spec.kind == "text_encoder":
        return TextEncoderGraph(models.text_encoder)
    if spec.kind == "vae_decoder":
        return VAEDecoderGraph(models.vae)
    if spec.kind == "vae_encoder":
        return VAEEncoderGraph(models.vae)
    raise PidrtError(f"unknown graph kind {spec.kind!r}")


def source_module(models: Models, kind: str) -> nn.Module:
    """The torch module whose weights a graph of `kind` holds (what its hash fingerprints)."""
    return models.unet if kind == "unet" else models.text_encoder if kind == "text_encoder" else models.vae
