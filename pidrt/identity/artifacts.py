"""Identity artifacts <-> the flat tensor dicts the store keeps.

SCA / IP-Adapter: the folded A, B, score bias and output bias of every cross layer, for the prompt half
and CFG's negative half, plus the tokens they were folded from (a few MB for SD1.5).
EAA: the projected K/V of every step and layer (the cached inversion features).
Layers are keyed by their index in the UNet's processor order, as adapter files are.
"""

from __future__ import annotations

import torch

from pidrt.errors import FormatError
from pidrt.models.attention import LayerInfo
from pidrt.models.folded import FoldedBranch
from pidrt.models.conditions import EAACondition, FoldedCondition, StepKV


def folded_to_tensors(cond: FoldedCondition, layers: list[LayerInfo],
                      tokens: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out = {f"tokens.{half}": t for half, t in tokens.items()}
    index = {layer.name: layer.index for layer in layers}
    for half in ("cond", "uncond"):
        for name, branch in getattr(cond, half).items():
            i = index[name]
            out[f"{half}.{i}.a"] = branch.a
            out[f"{half}.{i}.b"] = branch.b
            out[f"{half}.{i}.score_bias"] = branch.score_bias  # nonzero for post_out SCA (b_o W'_q)
            out[f"{half}.{i}.out_bias"] = branch.out_bias
    n_tokens = next(iter(cond.cond.values())).n_tokens
    return out, {"query": cond.query, "n_tokens": str(n_tokens)}


def folded_from_tensors(method: str, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                        layers: list[LayerInfo]) -> FoldedCondition:
    try:
        query, n_tokens = meta["query"], int(meta["n_tokens"])
        halves = {}
        for half in ("cond", "uncond"):
            halves[half] = {
                layer.name: FoldedBranch(
                    a=tensors[f"{half}.{layer.index}.a"],
                    b=tensors[f"{half}.{layer.index}.b"],
                    score_bias=tensors[f"{half}.{layer.index}.score_bias"],
                    out_bias=tensors[f"{half}.{layer.index}.out_bias"],
                    n_tokens=n_tokens,
                )
                for layer in layers if layer.kind == "cross"
            }
    except (KeyError, ValueError) as exc:
        raise FormatError(f"{method} identity artifact is missing {exc}; it was made for another UNet") from None
    return FoldedCondition(method, query, halves["cond"], halves["uncond"])


def eaa_to_tensors(steps: list[StepKV], layers: list[LayerInfo], latents_t: torch.Tensor,
                   caption: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    index = {layer.name: layer.index for layer in layers}
    out = {"latents_t": latents_t}
    for t, step in enumerate(steps):
        for name, (k, v) in step.items():
            out[f"step{t}.{index[name]}.k"] = k
            out[f"step{t}.{index[name]}.v"] = v
    return out, {"steps": str(len(steps)), "caption": caption}


def eaa_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], layers: list[LayerInfo],
                     adapter=None) -> EAACondition:
    try:
        steps = int(meta["steps"])
        return EAACondition(
            [{layer.name: (tensors[f"step{t}.{layer.index}.k"], tensors[f"step{t}.{layer.index}.v"]) for layer in layers}
             for t in range(steps)],
            latents_t=tensors["latents_t"], caption=meta["caption"], adapter=adapter,
        )
    except (KeyError, ValueError) as exc:
        raise FormatError(f"eaa identity artifact is missing {exc}; it was made for another UNet") from None


def concat_references(per_reference: list[list[StepKV]]) -> list[StepKV]:
    """Multi-reference EAA: references side by side along the token axis, step by step."""
    if len({len(r) for r in per_reference}) != 1:
        raise FormatError("EAA references must be recorded with the same step count")
    return [
        {name: (torch.cat([r[t][name][0] for r in per_reference]), torch.cat([r[t][name][1] for r in per_reference]))
         for name in per_reference[0][t]}
        for t in range(len(per_reference[0]))
    ]
