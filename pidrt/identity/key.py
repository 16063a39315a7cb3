"""Identity keys and tensor fingerprints: what an identity's artifacts depend on, hashed.

``IdentityKey`` names every input of an enrollment (image bytes, method, model and adapter
fingerprints, method parameters); its digest is the store's file name, so any changed input
yields a new entry instead of silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

import torch

from pidrt.errors import PidrtError

# "tokens": token identities (pidrt.identity.token_store), imported from files rather than enrolled from photos.
METHODS = ("sca", "eaa", "ip", "tokens")
ID_RE = re.compile(r"^(%s)-[0-9a-f]{16}$" % "|".join(METHODS))
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _param_str(name: str, value: Any) -> str:
    # Strings are taken verbatim; anything else by its canonical JSON so 512 and "512" agree
    # and tuples/lists/dicts hash deterministically.
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise PidrtError(f"identity key parameter {name!r}: {exc}") from exc


@dataclass(frozen=True)
class IdentityKey:
    """Everything an identity's artifacts depend on; ``id`` is derived from it."""

    images: tuple[str, ...]  # sha256 hex of each input image's bytes, in input order
    method: str
    base_fingerprint: str
    adapter_fingerprint: str
    params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        images = tuple(self.images)
        if not images or not all(isinstance(h, str) and SHA256_RE.match(h) for h in images):
            raise PidrtError("identity key needs one or more images given as sha256 hex digests")
        if self.method not in METHODS:
            raise PidrtError(f"unknown identity method {self.method!r}; expected one of {METHODS}")
        for name in ("base_fingerprint", "adapter_fingerprint"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise PidrtError(f"identity key {name} must be a non-empty string")
        params = tuple(tuple(p) for p in self.params)
        if not all(len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in params):
            raise PidrtError("identity key params must be (str, str) pairs")
        params = tuple(sorted(params))
        if len({k for k, _ in params}) != len(params):
            raise PidrtError("identity key params have a duplicated name")
        # Normalised in place so equal keys compare, hash and digest equal however built.
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "params", params)

    @classmethod
    def make(
        cls,
        images: Sequence[bytes],
        method: str,
        base_fingerprint: str,
        adapter_fingerprint: str,
        **params: Any,
    ) -> "IdentityKey":
        """Hash the raw image bytes and canonicalise ``params`` into sorted string pairs."""
        hashes = []
        for img in images:
            if not isinstance(img, (bytes, bytearray, memoryview)):
                raise PidrtError(f"identity images must be raw bytes, got {type(img).__name__}")
            hashes.append(hashlib.sha256(img).hexdigest())
        pairs = tuple((k, _param_str(k, v)) for k, v in params.items())
        return cls(tuple(hashes), method, base_fingerprint, adapter_fingerprint, pairs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": list(self.images),
            "method": self.method,
            "base_fingerprint": self.base_fingerprint,
            "adapter_fingerprint": self.adapter_fingerprint,
            "params": [list(p) for p in self.params],
        }

    @classmethod
    def from_dict(cls, d: Any) -> "IdentityKey":
        fields_ = {"images", "method", "base_fingerprint", "adapter_fingerprint", "params"}
        if not isinstance(d, dict) or set(d) != fields_:
            raise PidrtError(f"identity key must be an object with fields {sorted(fields_)}")
        try:
            params = tuple((k, v) for k, v in d["params"])
        except (TypeError, ValueError) as exc:
            raise PidrtError("identity key params must be a list of [name, value] pairs") from exc
        return cls(tuple(d["images"]), d["method"], d["base_fingerprint"], d["adapter_fingerprint"], params)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def id(self) -> str:
        return f"{self.method}-{self.digest[:16]}"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # Viewing as uint8 gives the raw bytes for every dtype, bf16 and fp8 included, without a copy
    # (numpy has no bf16); only non-contiguous or non-CPU tensors are copied.
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in sorted-name order (also the payload hash)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        # A JSON record per tensor frames the fields unambiguously (names may hold any character).
        h.update(json.dumps([name, str(t.dtype), list(t.shape), t.numel() * t.element_size()]).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def fingerprint_module(module: torch.nn.Module) -> str:
    """Fingerprint of a module's state dict (parameters and persistent buffers)."""
    return fingerprint_tensors(module.state_dict())
