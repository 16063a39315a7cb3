"""One attention processor for every identity method: the PyTorch reference of the branches.

pidrt installs `IdentityAttnProcessor` on all 32 attention layers of an SD1.5 UNet. What a
layer computes on a call is decided by data, not by which processor is installed: the shared
`BranchState` holds, per layer, an optional payload (a few-token branch for SCA / IP-Adapter,
projected K/V for EAA) and one scale per batch element. So one UNet (and later one engine)
serves every identity and method, and one batch may mix identities and strengths.

With no payload, or a scale of 0, a layer computes exactly what diffusers' `AttnProcessor2_0`
computes, op for op, so the base UNet's output is reproduced bit for bit.

Cross-attention reads a K context (for `to_k`) and a V context (for `to_v`): the UNet's
`encoder_hidden_states` for both unless the state gives a V context or per-layer contexts (token
identities, docs/token-identities.md). With equal contexts it is exactly the plain layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Union

import torch
import torch.nn.functional as F

from pidrt.errors import PidrtError
from pidrt.models.folded import FoldedBranch, folded_attention
from pidrt.models.retouch import SubjectMaps, SwapLayer

QuerySource = Literal["z", "x"]


@dataclass(frozen=True)
class LayerInfo:
    """An attention layer of the UNet, in diffusers' `attn_processors` order."""

    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    index: int  # position among all 32 layers; IP-Adapter files number attn2 layers by it
    kind: Literal["self", "cross"]
    channels: int
    heads: int


@dataclass
class UnfoldedBranch:
    """A few-token branch as the papers write it, per batch element.

    query "z": SCA, the query is the text-attention output projected by `w_q` [B, C, C]: Z in
    `pre_out`, Z_out = to_out(Z) in `post_out` (the output of the text cross-attention block,
    methods.md 1).
    query "x": IP-Adapter, the query is the layer's own `to_q(X)` (`w_q` is None).
    keys/values: [B, n, C], already projected from the tokens. `w_o` None means the shared
    `to_out` is applied to Z + scale * branch (`pre_out`); else the branch has its own output
    projection `w_o` [B, C, C] (x @ w_o convention) and bias `b_o` [B, C] (`post_out`), and the
    layer returns Z_out + scale * (SCA(Z_out) w_o + b_o).
    """

    query: QuerySource
    keys: torch.Tensor
    values: torch.Tensor
    w_q: torch.Tensor | None = None
    w_o: torch.Tensor | None = None
    b_o: torch.Tensor | None = None


@dataclass
class FoldedLayer:
    """The folded form of a few-token branch (methods.md section 2) and where its query comes from."""

    query: QuerySource
    branch: FoldedBranch


@dataclass
class EAAKV:
    """EAA for one layer and step: identity K/V [B, M, C] already projected by the EAA weights."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class EAARows:
    """EAA recomputed in the same batch: K/V projected from the layer inputs of reference rows.

    element_rows[b] lists the batch rows whose inputs are element b's references (empty: no
    identity); weights: `w_k`, `w_v` ([C, C], x @ w form) and, for cross layers, the token
    aggregation `agg_w` [s_c, s], `agg_b` [s_c].
    """

    element_rows: list[list[int]]
    weights: dict[str, torch.Tensor]

    def to_kv(self, x: torch.Tensor) -> EAAKV:
        rows = sorted({r for rs in self.element_rows for r in rs})
        feats = x[rows]
        if "agg_w" in self.weights:
            feats = torch.matmul(self.weights["agg_w"], feats) + self.weights["agg_b"][:, None]
        k, v = feats @ self.weights["w_k"], feats @ self.weights["w_v"]
        at = {r: i for i, r in enumerate(rows)}
        n_refs = max(len(rs) for rs in self.element_rows)

        def per_element(t):
            zero = t.new_zeros(n_refs * t.shape[1], t.shape[2])
            return torch.stack([t[[at[r] for r in rs]].flatten(0, 1) if rs else zero for rs in self.element_rows])

        return EAAKV(per_element(k), per_element(v))


Payload = Union[UnfoldedBranch, FoldedLayer, EAAKV, EAARows]


class FusedOps(Protocol):
    """Fused forms of the two branch computations; each must equal the reference path it replaces.

    Implementations: the Triton kernels (``pidrt.kernels.ops.TritonOps``) and the TensorRT plugin
    nodes an export can emit instead of plain ops (``pidrt.export.plugin_nodes.PluginNodes``).
    """

    def few_token(self, base: torch.Tensor, x: torch.Tensor, branch: FoldedBranch, scale: torch.Tensor) -> torch.Tensor:
        """base + scale[b] * folded_attention(x, branch), [B, N, C]."""

    def dual_kv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keys2: torch.Tensor,
                values2: torch.Tensor, sigma: torch.Tensor, heads: int) -> torch.Tensor:
        """attn(q, k, v) + sigma[b] * attn(q, k2, v2) on [B, tokens, C] tensors, heads merged."""


@dataclass
class LayerContexts:
    """Per-layer K and V contexts (the layer-group reading of token identities, P+).

    table: [T, L, D] encoded texts; keys / values: cross layer name -> [B] rows of `table` that the
    layer's `to_k` / `to_v` read for each batch element. Layers not named read the usual contexts.
    """

    table: torch.Tensor
    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]


@dataclass
class BranchState:
    """What the processors read on a UNet call; the pipeline (or an export wrapper) fills it.

    scale: [B] lambda (SCA/IP) or sigma (EAA) per batch element; 0 turns the branch off.
    layers: layer name -> payload; a missing layer runs plain attention.
    record: when a dict, every layer appends its normalised input X (EAA feature recording).
    explicit_attention: MatMul-Softmax-MatMul instead of SDPA (the ONNX pattern TensorRT fuses).
    fused: run folded branches and EAA through these fused ops (Triton kernels, or plugin nodes
    in an export) instead of the reference torch code; None: the reference.
    value_context: [B, L, D] what every cross layer's `to_v` reads (token identities); None: the
    K context (`encoder_hidden_states`), as in the plain UNet.
    layer_contexts: per-layer K and V contexts; on the layers it names they replace both.
    swap: self-attention layer name -> Layout-and-Retouch's K/V swap and output blend for this
    call (`pidrt.models.retouch.SwapLayer`); a missing layer is not edited.
    maps: when set, the cross layers it names record the subject tokens' attention maps.
    """

    scale: torch.Tensor | None = None
    layers: dict[str, Payload] = field(default_factory=dict)
    record: dict[str, list[torch.Tensor]] | None = None
    explicit_attention: bool = False
    fused: FusedOps | None = None
    value_context: torch.Tensor | None = None
    layer_contexts: LayerContexts | None = None
    swap: dict[str, SwapLayer] = field(default_factory=dict)
    maps: SubjectMaps | None = None

    def clear(self) -> None:
        self.scale = None
        self.layers = {}
        self.value_context = None
        self.layer_contexts = None
        self.swap = {}
        self.maps = None

    def cross_contexts(self, layer: str, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K context, V context) of cross layer `layer`, given the UNet's `encoder_hidden_states`."""
        lc = self.layer_contexts
        if lc is not None and layer in lc.keys:
            return lc.table[lc.keys[layer]], lc.table[lc.values[layer]]
        return context, context if self.value_context is None else self.value_context


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    bsz, tokens, channels = t.shape
    return t.view(bsz, tokens, heads, channels // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    bsz, heads, tokens, d = t.shape
    return t.transpose(1, 2).reshape(bsz, tokens, heads * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, explicit: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, H, N, d] tensors."""
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    # Scale split over q and k (d^-1/4 each) keeps fp16 scores in range, and is the form
    # TensorRT's attention fusion recognises.
    s = q.shape[-1] ** -0.25
    return torch.matmul(torch.matmul(q * s, (k * s).transpose(-1, -2)).softmax(dim=-1), v)


class IdentityAttnProcessor:
    """Drop-in diffusers attention processor that adds the identity branch named by the state."""

    def __init__(self, layer: LayerInfo, state: BranchState):
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None:
            raise PidrtError("pidrt's SD1.5 attention does not take attention masks")
        edit = self.state.swap.get(self.layer.name)
        out = self._attention(attn, hidden_states, encoder_hidden_states, edit)
        return out if edit is None else edit.blend(out)

    def _attention(self, attn, hidden_states, encoder_hidden_states, edit: SwapLayer | None):
        state = self.state
        x = hidden_states
        if state.record is not None:
            state.record.setdefault(self.layer.name, []).append(x.detach())
        ctx = v_ctx = x if encoder_hidden_states is None else encoder_hidden_states
        if self.layer.kind == "cross":
            ctx, v_ctx = state.cross_contexts(self.layer.name, ctx)
        heads = attn.heads
        query, key, value = attn.to_q(x), attn.to_k(ctx), attn.to_v(v_ctx)
        if edit is not None:
            key, value = edit.swap(key, value)
        if state.maps is not None:
            state.maps.add(self.layer.name, query, key, heads)
        payload = state.layers.get(self.layer.name) if state.scale is not None else None
        if isinstance(payload, EAARows):
            payload = payload.to_kv(x)
        fused = None if isinstance(payload, UnfoldedBranch) else state.fused
        if fused is not None and isinstance(payload, EAAKV):
            # One pass over both KV sets: the base attention is part of it, not computed apart.
            z = fused.dual_kv(query, key, value, payload.keys, payload.values, state.scale, heads)
            return attn.to_out[1](attn.to_out[0](z))
        q = split_heads(query, heads)
        z = merge_heads(attend(q, split_heads(key, heads), split_heads(value, heads), state.explicit_attention))
        z = z.to(query.dtype)
        if payload is None:
            return attn.to_out[1](attn.to_out[0](z))
        if fused is not None:
            source = z if payload.query == "z" else x
            return attn.to_out[1](fused.few_token(attn.to_out[0](z), source, payload.branch, state.scale))
        scale = state.scale.to(z.dtype).view(-1, 1, 1)
        if isinstance(payload, FoldedLayer):
            source = z if payload.query == "z" else x
            out = attn.to_out[0](z) + scale * folded_attention(source, payload.branch)
            return attn.to_out[1](out)
        if isinstance(payload, EAAKV):
            extra = attend(q, split_heads(payload.keys, heads), split_heads(payload.values, heads), state.explicit_attention)
            return attn.to_out[1](attn.to_out[0](z + scale * merge_heads(extra)))
        return attn.to_out[1](self._unfolded(attn, payload, z, query, scale))

    def _unfolded(self, attn, p: UnfoldedBranch, z, query, scale):
        heads = attn.heads
        z_out = None if p.w_o is None else attn.to_out[0](z)  # post_out: the block's output is the SCA input
        q_in = torch.bmm(z if z_out is None else z_out, p.w_q) if p.query == "z" else query
        branch = merge_heads(
            attend(split_heads(q_in, heads), split_heads(p.keys, heads), split_heads(p.values, heads),
                   self.state.explicit_attention)
        )
        if z_out is None:
            return attn.to_out[0](z + scale * branch)
        own = torch.bmm(branch, p.w_o) + (0 if p.b_o is None else p.b_o[:, None, :])
        return z_out + scale * own


def attention_layers(unet) -> list[LayerInfo]:
    """The UNet's attention layers in diffusers' processor order (attn1 even, attn2 odd in SD1.5)."""
    modules = dict(unet.named_modules())
    layers = []
    for index, key in enumerate(unet.attn_processors.keys()):
        name = key.removesuffix(".processor")
        attn = modules[name]
        kind = "cross" if attn.is_cross_attention else "self"
        layers.append(LayerInfo(name, index, kind, attn.to_q.out_features, attn.heads))
    return layers


def install(unet) -> BranchState:
    """Put an `IdentityAttnProcessor` on every attention layer; returns the state they share."""
    state = BranchState()
    modules = dict(unet.named_modules())
    processors = {}
    for layer in attention_layers(unet):
        attn = modules[layer.name]
        unsupported = [
            flag for flag, on in (
                ("spatial_norm", attn.spatial_norm is not None),
                ("group_norm", attn.group_norm is not None),
                ("norm_cross", bool(attn.norm_cross)),
                ("residual_connection", attn.residual_connection),
                ("rescale_output_factor", attn.rescale_output_factor != 1.0),
                ("norm_q/norm_k", attn.norm_q is not None or attn.norm_k is not None),
            ) if on
        ]
        if unsupported:
            raise PidrtError(f"{layer.name}: not an SD1.5 attention layer (has {', '.join(unsupported)})")
        processors[layer.name + ".processor"] = IdentityAttnProcessor(layer, state)
    unet.set_attn_processor(processors)
    unet.pidrt_state = state
    return state


def branch_state(unet) -> BranchState:
    """The state of a UNet prepared by `install` (installing on first use)."""
    return getattr(unet, "pidrt_state", None) or install(unet)
