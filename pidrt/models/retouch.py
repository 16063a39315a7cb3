"""Layout-and-Retouch's stage-2 attention edits as data: the swap, the blend, the subject maps.

The retouch stage (papers/layout-and-retouch.txt sec. 3.2.2, methods.md section 4) runs three
paths in one denoising loop: the layout path, the reference path and the target path. In the
self-attention layers of the decoder, from a given step on, the target's K and V are replaced
by the layout path's (early steps) or the reference path's (later steps), and from a given step
on the target's self-attention output is blended with the layout path's by a foreground mask
made from the target's cross-attention maps of the subject tokens (`pidrt.models.retouch_mask`).

`IdentityAttnProcessor` reads these edits from `BranchState.swap` (per self-attention layer, a
`SwapLayer`) and `BranchState.maps` (a `SubjectMaps` recorder). Every edit is an index or a
weight per batch element, never a graph variant: an element whose indices point at itself and
whose mask is 1 computes exactly the plain layer, so one UNet (one engine) serves every request.

Where the paper leaves a choice open it follows the prior work it names [5, 34] (appendix B.1:
"as for other parameters such as specific layers used for reference, we follow the prior
works"); `RetouchConfig` keeps those choices as data and names each source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from pidrt.errors import PidrtError

# SD1.5 has 16 transformer blocks; MasaCtrl and DreamMatcher number them in call order (their
# editors count attention calls and use `cur_att_layer // 2`): down 0-5, mid 6, up 7-15.
N_BLOCKS = 16


@dataclass(frozen=True)
class MaskConfig:
    """How the blend mask is made (`pidrt.models.retouch_mask`).

    threshold: on the min-max normalised map. DreamMatcher's run script: `thres` 0.05
      (cvlab-kaist/DreamMatcher run_dreammatcher.py); MasaCtrl's `MutualSelfAttentionControlMaskAuto`
      defaults to 0.1 (TencentARC/MasaCtrl masactrl/masactrl.py). The paper's released baselines are
      DreamMatcher's, so its value is the default.
    map_level: the latent size the maps are read at, as halvings of the latent. Both codes keep
      only the maps with 16 x 16 tokens at 512 px (`attn.shape[1] == 16 * 16`): level 2.
    map_blocks: which cross layers of that level average. The paper: maps "extracted from the
      decoder as in [5]"; MasaCtrl's code also averages the down-block layers of that size
      (("down_blocks", "up_blocks") reproduces it).
    min_component: the small connected sets removed, as a fraction of the mask's pixels. The
      paper says "below a specified volume threshold" without the number: pidrt's choice.
    """

    threshold: float = 0.05
    map_level: int = 2
    map_blocks: tuple[str, ...] = ("up_blocks",)
    min_component: float = 0.01

    def check(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise PidrtError(f"mask threshold must be in [0, 1]; got {self.threshold}")
        if not 0.0 <= self.min_component < 1.0:
            raise PidrtError(f"min_component must be in [0, 1); got {self.min_component}")
        unknown = set(self.map_blocks) - {"down_blocks", "mid_block", "up_blocks"}
        if unknown or not self.map_blocks:
            raise PidrtError(f"map_blocks must name down_blocks / mid_block / up_blocks; got {self.map_blocks}")


@dataclass(frozen=True)
class RetouchConfig:
    """The steps and layers of both stages. Steps are indices into the sampling schedule.

    layout_steps: k, stage 1's steps with the identity branch off (paper sec. 3.2.1 and C.1: 5 of 50).
    swap_start: first step whose self-attention K/V come from another path. MasaCtrl
      `start_step=4` (masactrl.py `MutualSelfAttentionControl`), DreamMatcher `initial_step: 4`.
    reference_start: first step whose K/V come from the reference path instead of the layout
      path. The paper's value lost its symbols in the text (B.1: "we set [..] for normal and
      challenging prompts"); pidrt's choice: 10 of 50, the layout drives the first fifth.
    blend_start: first step of the mask blend (B.1: "starts from [..] to the last step", value
      lost); None: reference_start, the step from which the target stops copying the layout.
      Must be >= 1: a step's mask comes from the previous step's maps.
    start_layer, end_layer: the transformer blocks (call order, 0-15) whose self-attention is
      edited. MasaCtrl `start_layer=10` of 16, DreamMatcher `initial_layer: 10`, `cut_layer: 16`.
    """

    layout_steps: int = 5
    swap_start: int = 4
    reference_start: int = 10
    blend_start: int | None = None
    start_layer: int = 10
    end_layer: int = N_BLOCKS
    mask: MaskConfig = MaskConfig()  # noqa: RUF009 (frozen, so sharing the default is safe)

    @property
    def blend_from(self) -> int:
        return self.reference_start if self.blend_start is None else self.blend_start

    def check(self, steps: int) -> None:
        """Clear errors for values that do not fit a schedule of `steps` steps."""
        for name in ("layout_steps", "swap_start", "reference_start"):
            value = getattr(self, name)
            if not 0 <= value <= steps:
                raise PidrtError(f"{name} must be in 0..{steps} for {steps} steps; got {value}")
        if self.reference_start < self.swap_start:
            raise PidrtError(f"reference_start ({self.reference_start}) must not come before swap_start "
                             f"({self.swap_start})")
        if not 1 <= self.blend_from <= steps:
            raise PidrtError(f"blend_start must be in 1..{steps} (a step's mask comes from the step before); "
                             f"got {self.blend_from}")
        if not 0 <= self.start_layer < self.end_layer <= N_BLOCKS:
            raise PidrtError(f"layers must satisfy 0 <= start_layer < end_layer <= {N_BLOCKS}; "
                             f"got {self.start_layer}, {self.end_layer}")
        self.mask.check()


def _group(name: str) -> int:
    return 0 if name.startswith("down_blocks") else 1 if name.startswith("mid_block") else 2


def call_order(layers: Sequence) -> list:
    """Layers sorted as a UNet call visits them (down, mid, up), which is how MasaCtrl counts.

    diffusers lists processors down, up, mid; within a group the names sort by block, then
    attention, then attn1 before attn2.
    """
    def key(layer):
        parts = layer.name.split(".")
        numbers = [int(p) for p in parts if p.isdigit()]
        return (_group(layer.name), numbers, parts[-1])

    return sorted(layers, key=key)


def swap_layers(layers: Sequence, config: RetouchConfig) -> list:
    """The self-attention layers the retouch edits (blocks start_layer..end_layer-1, call order)."""
    blocks = [layer for layer in call_order(layers) if layer.kind == "self"]
    if len(blocks) != N_BLOCKS:
        raise PidrtError(f"the retouch block numbering is SD1.5's ({N_BLOCKS} transformer blocks); "
                         f"this UNet has {len(blocks)}")
    return blocks[config.start_layer:config.end_layer]


def map_layers(layers: Sequence, mask: MaskConfig, n_levels: int) -> list:
    """The cross-attention layers whose subject maps are averaged (call order)."""
    from pidrt.models.adapters import layer_level

    return [layer for layer in call_order(layers) if layer.kind == "cross"
            and layer_level(layer.name, n_levels) == mask.map_level and layer.name.startswith(mask.map_blocks)]


@dataclass
class SwapLayer:
    """One self-attention layer's edits for one UNet call, per batch element (B rows).

    kv_source [B] long: the K/V element b attends to: its own row (b: no swap), another row
    r < B of the same call (a path riding in the batch), or B + b: element b's cached slot
    (`keys` / `values` [B, N, C], K/V projected through this layer's own to_k / to_v).
    out_source [B] long: the self-attention output element b is blended with, indexed the same
    way (`outputs` [B, N, C] are the slots); its own row: no blend.
    mask [B, N]: the weight of element b's own output; the layer returns
    out + (1 - mask) * (other - out), which is the paper's mask * out + (1 - mask) * other and is
    exactly `out` when the other output is its own or the mask is 1.
    """

    kv_source: torch.Tensor
    out_source: torch.Tensor
    mask: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    outputs: torch.Tensor | None = None

    def swap(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None:
            key = torch.cat([key, self.keys.to(key.dtype)])
            value = torch.cat([value, self.values.to(value.dtype)])
        return key.index_select(0, self.kv_source), value.index_select(0, self.kv_source)

    def blend(self, out: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return out
        bank = out if self.outputs is None else torch.cat([out, self.outputs.to(out.dtype)])
        other = bank.index_select(0, self.out_source)
        return out + (1 - self.mask.to(out.dtype))[..., None] * (other - out)


class LayerTap:
    """Stands in for a `SwapLayer` to record what a layer computes (K, V, output), editing nothing.

    Stage 1 taps the swap layers so the layout path's K/V/output per step can be served from
    memory in stage 2 (the recorded layout path) instead of inverting the layout image.
    """

    def __init__(self):
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []

    def swap(self, key, value):
        self.kv.append((key.detach(), value.detach()))
        return key, value

    def blend(self, out):
        self.outputs.append(out.detach())
        return out


@dataclass
class SubjectMaps:
    """Records cross-attention maps of the subject tokens (only in `layers`, only when installed).

    weights [B, T]: per element, the weight of each context token (1 on the subject's tokens,
    zeros: the element is not mapped). For a layer, the map is the head-averaged attention
    probability of each query token on the weighted tokens: mean_h(P_h) @ w, [B, N]. Summing
    over tokens (MasaCtrl's `aggregate_cross_attn_map` sums the listed tokens) and averaging
    over layers commute, so the runtime may average these per-layer maps over any subset.
    """

    weights: torch.Tensor
    layers: frozenset[str]
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, query: torch.Tensor, key: torch.Tensor, heads: int) -> None:
        if name not in self.layers:
            return
        self.maps[name] = attention_map(query, key, heads, self.weights)

    def mean(self, names: Sequence[str]) -> torch.Tensor:
        """[B, N]: the maps of `names` averaged (all must have been recorded)."""
        missing = [n for n in names if n not in self.maps]
        if missing:
            raise PidrtError(f"no subject map was recorded for {missing[:3]}")
        return torch.stack([self.maps[n] for n in names]).mean(0)


def attention_map(query: torch.Tensor, key: torch.Tensor, heads: int, weights: torch.Tensor) -> torch.Tensor:
    """mean over heads of softmax(q k^T / sqrt(d)), summed over tokens with `weights` [B, T] -> [B, N]."""
    b, n, c = query.shape
    d = c // heads
    q = query.view(b, n, heads, d).transpose(1, 2)
    k = key.view(b, key.shape[1], heads, d).transpose(1, 2)
    probs = (torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d))).softmax(dim=-1)
    return torch.matmul(probs.mean(1), weights.to(probs.dtype)[:, :, None])[..., 0]


def token_weights(positions: Sequence[Sequence[int]], tokens: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[B, tokens]: 1 at each element's subject token positions (position 0 is the start token)."""
    out = torch.zeros(len(positions), tokens, dtype=dtype, device=device)
    for b, pos in enumerate(positions):
        bad = [p for p in pos if not 0 < p < tokens]
        if bad:
            raise PidrtError(f"subject token positions must be in 1..{tokens - 1}; got {bad}")
        out[b, list(pos)] = 1.0
    return out
