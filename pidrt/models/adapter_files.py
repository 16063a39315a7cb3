"""Adapter files: pidrt's own safetensors layouts and importers for the published ones.

pidrt files carry `pidrt_schema` and `kind` in the safetensors metadata (docs/formats.md).
Published layouts read as they are:
- IP-Adapter `ip-adapter*.safetensors` (flat `image_proj.*` / `ip_adapter.<i>.to_{k,v}_ip.weight`)
  and `.bin` (`{"image_proj": {...}, "ip_adapter": {...}}`);
- the W+ adapter's `wplus_adapter.bin` (`{"w_proj": {...}, "wplus_adapter": {"<i>.to_{q,k,v}_wplus.weight"}}`),
  which is SCA with the W+ grouping, a LayerNorm and `pre_out`.
`.bin` files are read with `torch.load(weights_only=True)`: no code in them runs.

Every floating tensor must be finite (a NaN or inf weight turns every image it touches into
NaN): a file with one is refused, naming the tensor. A pidrt file may carry `default_scale`, the
identity strength a request gets when it names none (else the method's paper value,
`pidrt.runtime.requests.PAPER_SCALES`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Union

import torch

from pidrt.errors import FormatError
from pidrt.fileio import atomic_write
from pidrt.models.adapters import EAAAdapter, IPAdapterWeights, SCAAdapter
from pidrt.models.attention import LayerInfo
from pidrt.models.mapping import WPLUS_GROUPS

SCHEMA_VERSION = "1"
Adapter = Union[SCAAdapter, IPAdapterWeights, EAAAdapter]


def save_adapter(path: Path, adapter: Adapter) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors().items()}
    meta = {"pidrt_schema": SCHEMA_VERSION, **adapter.meta()}
    atomic_write(Path(path), save(tensors, metadata=meta))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, meta


def _read_bin(path: Path) -> dict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad pickles
        raise FormatError(f"{path}: cannot be read as a weights-only torch file ({exc})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a dict of state dicts, got {type(obj).__name__}")
    return obj


def _flatten(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    flat = {}
    for group, state in obj.items():
        if not isinstance(state, dict):
            raise FormatError(f"{path}: entry {group!r} is not a state dict")
        flat |= {f"{group}.{k}": v for k, v in state.items()}
    return flat


def _wplus_to_pidrt(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = {"to_q_wplus.weight": "to_q.weight", "to_k_wplus.weight": "to_k.weight", "to_v_wplus.weight": "to_v.weight"}
    out = {}
    for key, value in flat.items():
        if key.startswith("w_proj."):
            out["mapping." + key[len("w_proj."):]] = value
        elif key.startswith("wplus_adapter."):
            _, index, name = key.split(".", 2)
            out[f"layers.{index}.{renames.get(name, name)}"] = value
        else:
            out[key] = value  # reported as unexpected by the layout check
    return out


WPLUS_META = {
    "kind": "sca", "residual": "pre_out", "groups": json.dumps([list(g) for g in WPLUS_GROUPS]),
    "layernorm": "true", "mapping_bias": "false",
}


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise FormatError(f"{where}: tensor {name!r} has non-finite values ({bad}); the file is damaged "
                              "or was saved from a diverged training run")


def _default_scale(meta: dict[str, str], where: str) -> float | None:
    if "default_scale" not in meta:
        return None
    try:
        value = float(meta["default_scale"])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise FormatError(f"{where}: metadata default_scale must be a finite number >= 0; "
                          f"got {meta['default_scale']!r}")
    return value


def load_adapter(path: Path, layers: list[LayerInfo], token_dim: int, n_levels: int = 4) -> Adapter:
    """Read any supported adapter file and check it against the UNet's attention layers."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such adapter file")
    where = str(path)
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        kind = meta.get("kind")
        if meta.get("pidrt_schema") not in (None, SCHEMA_VERSION):
            raise FormatError(f"{path}: schema {meta['pidrt_schema']!r} is not supported (this pidrt reads {SCHEMA_VERSION})")
        if kind is None and any(k.startswith("image_proj.") for k in tensors):
            kind = "ip"  # a published IP-Adapter safetensors carries no metadata
    elif path.suffix in (".bin", ".pt", ".pth"):
        obj = _read_bin(path)
        if {"w_proj", "wplus_adapter"} <= set(obj):
            flat = _flatten(obj, path)
            _check_finite(flat, where)  # before renaming: the message names the file's own key
            tensors, meta, kind = _wplus_to_pidrt(flat), WPLUS_META, "sca"
        elif {"image_proj", "ip_adapter"} <= set(obj):
            tensors, meta, kind = _flatten(obj, path), {}, "ip"
        else:
            raise FormatError(
                f"{path}: top-level keys {sorted(obj)[:10]} match neither IP-Adapter (image_proj, ip_adapter) "
                "nor the W+ adapter (w_proj, wplus_adapter)"
            )
    else:
        raise FormatError(f"{path}: unsupported adapter file type {path.suffix!r} (.safetensors or .bin)")
    _check_finite(tensors, where)
    if kind == "sca":
        adapter = SCAAdapter.from_tensors(tensors, meta, layers, where)
    elif kind == "ip":
        adapter = IPAdapterWeights.from_tensors(tensors, layers, token_dim, where)
    elif kind == "eaa":
        adapter = EAAAdapter.from_tensors(tensors, meta, layers, n_levels, where)
    else:
        raise FormatError(f"{path}: unknown adapter kind {kind!r}; metadata 'kind' must be sca, ip or eaa")
    adapter.default_scale = _default_scale(meta, where)
    return adapter
