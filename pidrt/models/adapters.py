"""The weights each identity method adds to the UNet, as plain tensor containers.

Per-layer tensors use torch `nn.Linear` layout ([out, in]) and are keyed by the layer's index in
diffusers' processor order, the numbering published IP-Adapter and W+ adapter files use
(attn2 layers are 1, 3, ..., 31 in SD1.5). `tensors()` gives pidrt's flat file layout and
`from_tensors` reads it back, checking every key and shape against the UNet it will run on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from pidrt.errors import FormatError
from pidrt.models.attention import LayerInfo
from pidrt.models.image_proj import ImageProjModel, image_proj_from_state
from pidrt.models.mapping import MappingNetwork, WPLUS_GROUPS
from pidrt.models.statedict import check_state, strict_load

RESIDUAL_MODES = ("pre_out", "post_out")


def _linear(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=gen) / in_f**0.5


def _cross(layers: list[LayerInfo]) -> list[LayerInfo]:
    return [layer for layer in layers if layer.kind == "cross"]


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _scale_meta(default_scale: float | None) -> dict[str, str]:
    """The `default_scale` metadata entry (adapter_files reads it back), when the adapter sets one."""
    return {} if default_scale is None else {"default_scale": repr(float(default_scale))}


def _by_layer(state: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """{"<prefix>.<index>.<name>": t} -> {index: {name: t}} (keys already checked)."""
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        _, index, name = key.split(".", 2)
        per_layer.setdefault(int(index), {})[name] = value
    return per_layer


@dataclass
class SCAAdapter:
    """PIDiff Style Cross-Attention for one identity: mapping network F and per-layer W'_q/k/v."""

    mapping: MappingNetwork
    layers: dict[int, dict[str, torch.Tensor]]  # attn2 index -> to_q/to_k/to_v(/to_out.*).weight...
    residual: str = "pre_out"
    default_scale: float | None = None  # lambda when a request names none (None: PIDiff's 0.4)

    @property
    def n_tokens(self) -> int:
        return self.mapping.n_tokens

    @staticmethod
    def layer_layout(layer: LayerInfo, token_dim: int, residual: str) -> dict[str, tuple[int, ...]]:
        c = layer.channels
        shapes = {"to_q.weight": (c, c), "to_k.weight": (c, token_dim), "to_v.weight": (c, token_dim)}
        if residual == "post_out":
            shapes |= {"to_out.weight": (c, c), "to_out.bias": (c,)}
        return shapes

    @classmethod
    def random(cls, layers: list[LayerInfo], token_dim: int, seed: int = 0, residual: str = "pre_out",
               groups=WPLUS_GROUPS, layernorm: bool = True) -> "SCAAdapter":
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        mapping = MappingNetwork(groups, token_dim, layernorm).eval().requires_grad_(False)
        per_layer = {}
        for layer in _cross(layers):
            shapes = cls.layer_layout(layer, token_dim, residual)
            per_layer[layer.index] = {
                k: (_linear(*s, gen) if len(s) == 2 else torch.randn(s, generator=gen) * 0.02) for k, s in shapes.items()
            }
        return cls(mapping, per_layer, residual)

    def meta(self) -> dict[str, str]:
        return {
            "kind": "sca",
            "residual": self.residual,
            "n_tokens": str(self.n_tokens),
            "groups": json.dumps([list(g) for g in self.mapping.groups]),
            "layernorm": json.dumps(self.mapping.norm is not None),
            "mapping_bias": json.dumps(self.mapping.proj_0.bias is not None),
        } | _scale_meta(self.default_scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"mapping.{k}": v for k, v in self.mapping.state_dict().items()}
        for index, weights in self.layers.items():
            out |= {f"layers.{index}.{k}": v for k, v in weights.items()}
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], layers: list[LayerInfo],
                     where: str) -> "SCAAdapter":
        try:
            residual = meta["residual"]
            groups = json.loads(meta["groups"])
            layernorm = json.loads(meta["layernorm"])
            bias = json.loads(meta.get("mapping_bias", "false"))
        except (KeyError, ValueError) as exc:
            raise FormatError(f"{where}: SCA metadata is missing or malformed ({exc!r}); have {sorted(meta)}") from None
        if residual not in RESIDUAL_MODES:
            raise FormatError(f"{where}: residual must be one of {RESIDUAL_MODES}, got {residual!r}")
        mapping_state = _prefixed("mapping.", tensors)
        token_dim = next((v.shape[0] for k, v in mapping_state.items() if k == "proj_0.weight"), None)
        if token_dim is None:
            raise FormatError(f"{where}: missing key mapping.proj_0.weight")
        mapping = MappingNetwork(groups, token_dim, layernorm, bias).eval().requires_grad_(False)
        strict_load(mapping, mapping_state, f"{where} (mapping network)")
        expected = {}
        for layer in _cross(layers):
            expected |= {f"layers.{layer.index}.{k}": s for k, s in cls.layer_layout(layer, token_dim, residual).items()}
        layer_state = {k: v for k, v in tensors.items() if not k.startswith("mapping.")}
        check_state(expected, layer_state, where)
        return cls(mapping, _by_layer(layer_state), residual)


@dataclass
class IPAdapterWeights:
    """IP-Adapter: the image-projection model and to_k_ip/to_v_ip of every attn2 layer (shared by all identities)."""

    image_proj: nn.Module
    layers: dict[int, dict[str, torch.Tensor]]  # attn2 index -> {"to_k_ip.weight", "to_v_ip.weight"}
    default_scale: float | None = None  # when a request names none (None: 1.0, diffusers' default)

    @property
    def n_tokens(self) -> int:
        return self.image_proj.n_tokens

    @classmethod
    def random(cls, layers: list[LayerInfo], token_dim: int, seed: int = 0, embeddings_dim: int = 64,
               n_tokens: int = 4) -> "IPAdapterWeights":
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        proj = ImageProjModel(token_dim, embeddings_dim, n_tokens).eval().requires_grad_(False)
        per_layer = {
            layer.index: {
                "to_k_ip.weight": _linear(layer.channels, token_dim, gen),
                "to_v_ip.weight": _linear(layer.channels, token_dim, gen),
            }
            for layer in _cross(layers)
        }
        return cls(proj, per_layer)

    def meta(self) -> dict[str, str]:
        return {"kind": "ip", "n_tokens": str(self.n_tokens)} | _scale_meta(self.default_scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"image_proj.{k}": v for k, v in self.image_proj.state_dict().items()}
        for index, weights in self.layers.items():
            out |= {f"ip_adapter.{index}.{k}": v for k, v in weights.items()}
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layers: list[LayerInfo], token_dim: int,
                     where: str) -> "IPAdapterWeights":
        proj_state = _prefixed("image_proj.", tensors)
        if not proj_state:
            raise FormatError(f"{where}: no image_proj.* keys; is this an IP-Adapter file?")
        lora = sorted(k for k in tensors if "_lora" in k)
        if lora:
            raise FormatError(f"{where}: has LoRA keys ({len(lora)}, e.g. {lora[0]}); FaceID LoRA is not supported")
        image_proj = image_proj_from_state(proj_state, token_dim).eval().requires_grad_(False)
        expected = {}
        for layer in _cross(layers):
            for name in ("to_k_ip.weight", "to_v_ip.weight"):
                expected[f"ip_adapter.{layer.index}.{name}"] = (layer.channels, token_dim)
        layer_state = {k: v for k, v in tensors.items() if not k.startswith("image_proj.")}
        check_state(expected, layer_state, where)
        return cls(image_proj, _by_layer(layer_state))


def layer_level(name: str, n_levels: int) -> int:
    """How many times the latent has been halved where the layer runs (0 = full latent size)."""
    if name.startswith("mid_block"):
        return n_levels - 1
    block = int(name.split(".")[1])
    return block if name.startswith("down_blocks") else n_levels - 1 - block


def layer_tokens(name: str, latent_size: int, n_levels: int) -> int:
    side = latent_size // 2 ** layer_level(name, n_levels)
    return side * side


@dataclass
class EAAAdapter:
    """Inv-Adapter's Embedded Attention Adapter: shared by every identity (zero-shot).

    Self layers: to_k/to_v ([C, C]) on recorded attn1 inputs. Cross layers: token aggregation
    `agg` over the sequence axis (s -> s_c, so it is sized for one latent resolution) and
    to_k/to_v on the aggregated attn2 inputs.
    """

    layers: dict[int, dict[str, torch.Tensor]]
    s_c: int
    latent_size: int
    default_scale: float | None = None  # sigma when a request names none (None: pidrt's 0.8)

    @staticmethod
    def layer_layout(layer: LayerInfo, s_c: int, latent_size: int, n_levels: int) -> dict[str, tuple[int, ...]]:
        c = layer.channels
        shapes = {"to_k.weight": (c, c), "to_v.weight": (c, c)}
        if layer.kind == "cross":
            s = layer_tokens(layer.name, latent_size, n_levels)
            shapes |= {"agg.weight": (s_c, s), "agg.bias": (s_c,)}
        return shapes

    @classmethod
    def random(cls, layers: list[LayerInfo], latent_size: int, n_levels: int, s_c: int = 16,
               seed: int = 0) -> "EAAAdapter":
        gen = torch.Generator().manual_seed(seed)
        per_layer = {}
        for layer in layers:
            shapes = cls.layer_layout(layer, s_c, latent_size, n_levels)
            per_layer[layer.index] = {
                k: (_linear(*s, gen) if len(s) == 2 else torch.zeros(s)) for k, s in shapes.items()
            }
        return cls(per_layer, s_c, latent_size)

    def meta(self) -> dict[str, str]:
        return {"kind": "eaa", "s_c": str(self.s_c), "latent_size": str(self.latent_size)} | _scale_meta(self.default_scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{k}": v for i, weights in self.layers.items() for k, v in weights.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], layers: list[LayerInfo],
                     n_levels: int, where: str) -> "EAAAdapter":
        try:
            s_c, latent_size = int(meta["s_c"]), int(meta["latent_size"])
        except (KeyError, ValueError) as exc:
            raise FormatError(f"{where}: EAA metadata needs integer s_c and latent_size ({exc!r})") from None
        expected = {}
        for layer in layers:
            expected |= {f"layers.{layer.index}.{k}": s
                         for k, s in cls.layer_layout(layer, s_c, latent_size, n_levels).items()}
        check_state(expected, tensors, where)
        return cls(_by_layer(tensors), s_c, latent_size)
