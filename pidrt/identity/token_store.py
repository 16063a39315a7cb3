"""Token identities in the identity store: imported from a token file, stored content-addressed.

A token identity is trained elsewhere; pidrt only stores and serves it. Its entry holds the pidrt
token layout (`token_files.to_tensors`: tensors `keys`, `values`, metadata `placeholder`,
`reading`, `step_bounds`, `layer_stages`, `base_model`, `name`) under the store's schema-2
integrity (payload and metadata hashes verified on every load), so an edited entry is reported
as corrupt and never served.

Its key hashes the identity's content (tensors and metadata but its name), not the file's bytes: the same
embedding imported from a diffusers, an A1111 or a pidrt file is one entry. The key also names
the base model being served (like every identity's key), since the tokens are checked against
its text encoder when they are enrolled.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from pidrt.errors import PidrtError
from pidrt.identity.key import IdentityKey, fingerprint_tensors
from pidrt.identity.store import IdentityStore
from pidrt.identity.token_files import from_tensors, load_tokens, to_tensors
from pidrt.models.tokens import TokenIdentity

METHOD = "tokens"
NO_ADAPTER = "none"  # token identities need no adapter; the key field must not be empty
MAX_FILE_BYTES = 64 * 1024 * 1024  # an embedding is kilobytes; anything near this is not one


def token_key(identity: TokenIdentity, base_fingerprint: str) -> IdentityKey:
    tensors, meta = to_tensors(identity)
    meta.pop("name")  # a label: the same tokens under two names are one identity (the first name is kept)
    content = json.dumps([fingerprint_tensors(tensors), meta], sort_keys=True).encode()
    return IdentityKey.make([content], METHOD, base_fingerprint, NO_ADAPTER)


def store_tokens(store: IdentityStore, identity: TokenIdentity, base_fingerprint: str) -> tuple[str, bool]:
    """(id, created): the identity put in `store` (an existing entry for the same content is kept)."""
    key = token_key(identity, base_fingerprint)
    ident, _, _, created = store.get_or_create(key, lambda: to_tensors(identity))
    return ident, created


def import_tokens(store: IdentityStore, path: Path | str, base_fingerprint: str, text_dim: int,
                  placeholder: str | None = None) -> tuple[str, bool]:
    """A token file of any supported layout (pidrt.identity.token_files), checked against the text
    encoder's width and the base model, into `store`; (id, created)."""
    identity = load_tokens(path, text_dim=text_dim, placeholder=placeholder or None, base_model=base_fingerprint)
    return store_tokens(store, identity, base_fingerprint)


def sniff_suffix(data: bytes) -> str:
    """The file type of an uploaded token file by its content, not the client's file name:
    safetensors starts with an 8-byte header length and a JSON object; torch files are zips or pickles."""
    if len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data):
        return ".safetensors"
    return ".pt"


def import_token_bytes(store: IdentityStore, data: bytes, name: str, base_fingerprint: str, text_dim: int,
                       placeholder: str | None = None) -> tuple[str, bool]:
    """`import_tokens` of an uploaded file; `name` (the upload's file name) gives the placeholder
    of layouts that take it from the file name (A1111 `emb_params` safetensors)."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise PidrtError("token enrollment needs one non-empty token file")
    if len(data) > MAX_FILE_BYTES:
        raise PidrtError(f"{name}: a token file of {len(data)} bytes is larger than the {MAX_FILE_BYTES} byte limit")
    # Only the stem is kept, reduced to safe characters: the name must not choose a path.
    stem = re.sub(r"[^\w<>.+-]", "_", Path(str(name).replace("\\", "/")).stem)[:64].strip(".") or "tokens"
    with tempfile.TemporaryDirectory(prefix="pidrt-tokens-") as tmp:
        path = Path(tmp) / f"{stem}{sniff_suffix(data)}"
        path.write_bytes(data)
        try:
            return import_tokens(store, path, base_fingerprint, text_dim, placeholder)
        except PidrtError as exc:  # name the upload, not the temporary copy
            raise PidrtError(str(exc).replace(str(path), str(name))) from None


def stored_tokens(store: IdentityStore, identity_id: str) -> TokenIdentity:
    """The verified entry as a TokenIdentity (CorruptEntryError / UnknownIdentityError if not)."""
    tensors, meta = store.get(identity_id)
    return from_tensors(tensors, meta, f"identity {identity_id}")


def summary(entry) -> dict:
    """What listings show of a token entry (a store EntryInfo): placeholder, stages, reading, base model."""
    if entry.method != METHOD:
        return {}
    shape = entry.tensors.get("keys", ("", (0, 0, 0)))[1]
    m = entry.meta
    return {"placeholder": m.get("placeholder"), "stages": shape[0] if shape else 0,
            "tokens": shape[1] if len(shape) > 1 else 0, "reading": m.get("reading"),
            "step_bounds": json.loads(m.get("step_bounds") or "[]"), "base_model": m.get("base_model") or None,
            "name": m.get("name") or None}
