"""Token-identity files: pidrt's own safetensors layout and importers for textual inversion.

pidrt layout (`save_tokens`): tensors `keys` and `values` [stages, tokens, dim]; safetensors
metadata `pidrt_schema` "1", `kind` "tokens", `placeholder`, `reading` ("steps" | "layers"),
`step_bounds` (JSON list of timesteps), `layer_stages` (JSON object: cross layer name -> stage),
`base_model` (fingerprint of the base model it was trained for, "" unknown), `name`, `source`.
`to_tensors` / `from_tensors` are that layout without the file (an identity-store payload).

Published textual-inversion layouts, read as they are (one stage, K = V, every step):
- diffusers `learned_embeds.safetensors` / `.bin`: one entry `{"<token>": [n, dim] or [dim]}`;
  the placeholder is the key;
- AUTOMATIC1111 `.pt` (also `.bin`): `{"string_to_token": {"*": 265}, "string_to_param": {"*":
  [n, dim]}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}`; the placeholder is `name`;
- A1111 / kohya `.safetensors`: `{"emb_params": [n, dim]}`; the placeholder is the file's stem.
Pickles are read with `torch.load(weights_only=True)`: no code in them runs. Token widths are
checked against the text encoder (768 for SD1.5).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from pidrt.errors import FormatError, PidrtError
from pidrt.fileio import atomic_write
from pidrt.models.adapter_files import _read_bin, _read_safetensors
from pidrt.models.tokens import TokenIdentity

SCHEMA_VERSION = "1"
KIND = "tokens"
PICKLES = (".pt", ".bin", ".pth")


def to_tensors(identity: TokenIdentity) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The pidrt layout's tensors and metadata (a token file's, and an identity-store payload's)."""
    meta = {
        "placeholder": identity.placeholder, "reading": identity.reading,
        "step_bounds": json.dumps(list(identity.step_bounds)), "layer_stages": json.dumps(dict(identity.layer_stages)),
        "base_model": identity.base_model, "name": identity.name,
    }
    # Two tensors even when K = V: safetensors refuses shared storage, and one layout is simpler.
    tensors = {"keys": identity.keys.detach().to("cpu").contiguous().clone(),
               "values": identity.values.detach().to("cpu").contiguous().clone()}
    return tensors, meta


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str) -> TokenIdentity:
    """The inverse of `to_tensors`; errors name `where` (a file, a store entry)."""
    if set(tensors) != {"keys", "values"}:
        raise FormatError(f"{where}: a token identity holds tensors keys and values; got {sorted(tensors)}")
    try:
        return TokenIdentity(
            placeholder=meta.get("placeholder", ""), keys=tensors["keys"].float(), values=tensors["values"].float(),
            reading=meta.get("reading", "steps"), step_bounds=tuple(json.loads(meta.get("step_bounds", "[]"))),
            layer_stages=tuple(json.loads(meta.get("layer_stages", "{}")).items()),
            base_model=meta.get("base_model", ""), name=meta.get("name", ""),
        )
    except (ValueError, AttributeError, PidrtError) as exc:
        raise FormatError(f"{where}: {exc}") from None


def save_tokens(path: Path | str, identity: TokenIdentity, source: str = "pidrt") -> None:
    from safetensors.torch import save

    tensors, meta = to_tensors(identity)
    meta |= {"pidrt_schema": SCHEMA_VERSION, "kind": KIND, "source": source}
    atomic_write(Path(path), save(tensors, metadata=meta))


def _one_tensor(path: Path, entries: dict, what: str) -> tuple[str, torch.Tensor]:
    if len(entries) != 1:
        raise FormatError(f"{path}: a {what} holds exactly one embedding; got keys {sorted(entries)[:6]}")
    (key, value), = entries.items()
    if not isinstance(value, torch.Tensor):
        raise FormatError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return str(key), value


def _textual_inversion(path: Path, tensors: dict[str, torch.Tensor] | None) -> tuple[str, torch.Tensor, str]:
    """(token name, vectors, source) of a published textual-inversion file (`tensors`: its
    safetensors content, None for a pickle)."""
    if tensors is not None:
        key, vectors = _one_tensor(path, tensors, "textual-inversion safetensors")
        return (path.stem, vectors, "a1111") if key == "emb_params" else (key, vectors, "diffusers")
    obj = _read_bin(path)
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict):
            raise FormatError(f"{path}: string_to_param is a {type(params).__name__}, not a dict of tensors")
        _, vectors = _one_tensor(path, params, "A1111 embedding's string_to_param")
        name = obj.get("name")
        return (name if isinstance(name, str) and name else path.stem), vectors, "a1111"
    key, vectors = _one_tensor(path, obj, "diffusers learned_embeds file")
    return key, vectors, "diffusers"


def load_tokens(path: Path | str, text_dim: int | None = None, placeholder: str | None = None,
                base_model: str | None = None) -> TokenIdentity:
    """Any supported token file as a `TokenIdentity`, checked against the text encoder's width
    (`text_dim`) and, when the file names one, the base model (`base_model` fingerprint).

    placeholder overrides the file's (a textual-inversion token such as `<cat-toy>`, an A1111
    name such as `me`).
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such token file")
    if path.suffix not in (".safetensors", *PICKLES):
        raise FormatError(f"{path}: unsupported token file type {path.suffix!r} (.safetensors, .pt or .bin)")
    tensors, meta = _read_safetensors(path) if path.suffix == ".safetensors" else (None, {})
    try:
        if meta.get("kind") == KIND:
            if meta.get("pidrt_schema") != SCHEMA_VERSION:
                raise FormatError(f"{path}: schema {meta.get('pidrt_schema')!r} is not supported "
                                  f"(this pidrt reads {SCHEMA_VERSION})")
            identity = from_tensors(tensors, meta, str(path))
        else:
            name, vectors, source = _textual_inversion(path, tensors)
            vectors = vectors.detach().float()
            if vectors.dim() == 1:
                vectors = vectors[None]  # diffusers' single-vector files store [dim]
            if vectors.dim() != 2 or 0 in vectors.shape:
                raise PidrtError(f"a {source} textual-inversion embedding is [tokens, dim]; got {tuple(vectors.shape)}")
            identity = TokenIdentity.textual_inversion(name, vectors, name=name)
        if placeholder:
            identity = replace(identity, placeholder=placeholder)
        identity.check(text_dim if text_dim is not None else identity.dim, base_model=base_model)
    except FormatError:
        raise
    except PidrtError as exc:
        raise FormatError(f"{path}: {exc}") from None
    return identity
