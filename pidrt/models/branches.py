"""Turn identities into the per-layer payloads `IdentityAttnProcessor` reads, for a whole batch.

Each batch element carries its own identity (or none), so payload tensors are stacked along
the batch axis. An element with no identity gets zero tensors and must run with scale 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from pidrt.errors import PidrtError
from pidrt.models.adapters import EAAAdapter, IPAdapterWeights, SCAAdapter
from pidrt.models.attention import EAAKV, FoldedLayer, LayerInfo, Payload, UnfoldedBranch
from pidrt.models.folded import FoldedBranch, fold_branch


@dataclass
class SCAIdentity:
    """SCA for one batch element: the identity's adapter and its tokens F(w) (or F(0) for CFG's negative half)."""

    adapter: SCAAdapter
    tokens: torch.Tensor  # [n, token_dim]


@dataclass
class IPIdentity:
    """IP-Adapter for one batch element: the shared adapter and the image tokens."""

    adapter: IPAdapterWeights
    tokens: torch.Tensor  # [n, token_dim]


FewToken = Union[SCAIdentity, IPIdentity]


def _linear_t(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear weight [out, in] -> x @ w form [in, out]."""
    return weight.t()


def _element_terms(item: FewToken, layer: LayerInfo, attn) -> dict[str, torch.Tensor | None]:
    """One element's branch terms for one layer, in x @ w convention."""
    to_out = attn.to_out[0]
    # Adapters and tokens may live on the CPU in fp32 while the UNet runs elsewhere.
    like = attn.to_q.weight
    tokens = item.tokens.to(like)
    w = {k: v.to(like) for k, v in item.adapter.layers[layer.index].items()}
    if isinstance(item, SCAIdentity):
        own_out = item.adapter.residual == "post_out"
        return {
            "w_q": _linear_t(w["to_q.weight"]),
            "keys": tokens @ _linear_t(w["to_k.weight"]),
            "values": tokens @ _linear_t(w["to_v.weight"]),
            "w_o": _linear_t(w["to_out.weight"] if own_out else to_out.weight),
            "b_o": w["to_out.bias"] if own_out else None,
            "b_q": None,
        }
    return {
        "w_q": _linear_t(attn.to_q.weight),
        "keys": tokens @ _linear_t(w["to_k_ip.weight"]),
        "values": tokens @ _linear_t(w["to_v_ip.weight"]),
        "w_o": _linear_t(to_out.weight),
        "b_o": None,
        "b_q": attn.to_q.bias,
    }


def _stack(terms: list[dict | None], key: str) -> torch.Tensor | None:
    present = [t for t in terms if t is not None and t[key] is not None]
    if not present:
        return None
    like = present[0][key]
    return torch.stack([t[key] if t is not None and t[key] is not None else torch.zeros_like(like) for t in terms])


def few_token_payloads(unet, layers: Sequence[LayerInfo], items: Sequence[FewToken | None],
                       folded: bool = True) -> dict[str, Payload]:
    """Payloads of the SCA or IP-Adapter branch for a batch (one item per batch element)."""
    present = [i for i in items if i is not None]
    if not present:
        return {}
    kinds = {type(i) for i in present}
    if len(kinds) > 1:
        raise PidrtError("one batch runs one identity method; got both SCA and IP-Adapter identities")
    if len({i.tokens.shape for i in present}) > 1:
        raise PidrtError(f"identities in one batch need the same token count; got {[tuple(i.tokens.shape) for i in present]}")
    if isinstance(present[0], SCAIdentity) and len({i.adapter.residual for i in present}) > 1:
        raise PidrtError("SCA identities in one batch must share the residual mode")
    query = "z" if isinstance(present[0], SCAIdentity) else "x"
    own_out = query == "z" and present[0].adapter.residual == "post_out"
    modules = dict(unet.named_modules())
    payloads: dict[str, Payload] = {}
    for layer in layers:
        if layer.kind != "cross":
            continue
        attn = modules[layer.name]
        terms = [None if i is None else _element_terms(i, layer, attn) for i in items]
        keys, values = _stack(terms, "keys"), _stack(terms, "values")
        if folded:
            w_q, b_q = _stack(terms, "w_q"), _stack(terms, "b_q")
            if own_out:
                # post_out queries Z_out = Z W_o + b_o (methods.md 1): the folded query reads Z, so
                # W_o W'_q enters A and b_o W'_q becomes the score bias.
                to_out = attn.to_out[0]
                w_q, b_q = _linear_t(to_out.weight).to(w_q) @ w_q, (
                    None if to_out.bias is None else to_out.bias.to(w_q) @ w_q)
            branch = fold_branch(w_q, keys, values, _stack(terms, "w_o"), layer.heads, b_q=b_q,
                                 b_o=_stack(terms, "b_o"))
            payloads[layer.name] = FoldedLayer(query, branch)
        else:
            payloads[layer.name] = UnfoldedBranch(
                query, keys, values,
                w_q=_stack(terms, "w_q") if query == "z" else None,
                w_o=_stack(terms, "w_o") if own_out else None,
                b_o=_stack(terms, "b_o") if own_out else None,
            )
    return payloads


def project_eaa(adapter: EAAAdapter, layers: Sequence[LayerInfo],
                features: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Recorded layer inputs of one step ({name: [s, C]}) -> the EAA K/V the processors consume.

    Cross layers aggregate tokens first (s -> s_c); this is what the identity cache stores, so a
    generation never runs the projections again.
    """
    out = {}
    for layer in layers:
        feats = features[layer.name]
        w = adapter.layers[layer.index]
        if layer.kind == "cross":
            feats = w["agg.weight"].to(feats.dtype) @ feats + w["agg.bias"].to(feats.dtype)[:, None]
        out[layer.name] = (feats @ _linear_t(w["to_k.weight"]).to(feats.dtype),
                           feats @ _linear_t(w["to_v.weight"]).to(feats.dtype))
    return out


def eaa_payloads(layers: Sequence[LayerInfo],
                 items: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]] | None]) -> dict[str, Payload]:
    """Stack one step's projected K/V of each batch element (None: zeros, to run with sigma 0)."""
    present = [i for i in items if i is not None]
    if not present:
        return {}
    payloads: dict[str, Payload] = {}
    for layer in layers:
        k_like, v_like = present[0][layer.name]
        keys = torch.stack([k_like.new_zeros(k_like.shape) if i is None else i[layer.name][0] for i in items])
        values = torch.stack([v_like.new_zeros(v_like.shape) if i is None else i[layer.name][1] for i in items])
        payloads[layer.name] = EAAKV(keys, values)
    return payloads


def folded_of(payloads: dict[str, Payload]) -> dict[str, FoldedBranch]:
    """The FoldedBranch of every folded layer (what identity artifacts store for SCA/IP)."""
    return {name: p.branch for name, p in payloads.items() if isinstance(p, FoldedLayer)}
