"""Token identities in the identity store: imported from every file layout, content-addressed,
verified on load (an edited entry is reported, never used), described in listings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from pidrt.errors import PidrtError
from pidrt.identity.store import CorruptEntryError, IdentityStore
from pidrt.identity.token_files import save_tokens
from pidrt.identity.token_store import import_token_bytes, store_tokens, stored_tokens, summary
from pidrt.models.presets import TINY
from pidrt.models.tokens import TokenIdentity

D = TINY.text.hidden_size
BASE = "b" * 64


def vectors(n=2, seed=0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def a1111_pt(tmp_path, vec, name="me") -> bytes:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec.clone())},
                "name": name, "step": 3000}, tmp_path / "x.pt")
    return (tmp_path / "x.pt").read_bytes()


def test_every_layout_imports_to_one_content_addressed_entry(tmp_path):
    store = IdentityStore(tmp_path / "store")
    v = vectors()
    diffusers = save({"<me>": v.clone()})
    ident, created = import_token_bytes(store, diffusers, "learned_embeds.safetensors", BASE, D)
    assert created and ident.startswith("tokens-") and ident in store
    # The same embedding in A1111's pickle (name "<me>") and in pidrt's layout is the same entry.
    again, created = import_token_bytes(store, a1111_pt(tmp_path, v, "<me>"), "me.pt", BASE, D)
    assert (again, created) == (ident, False)
    save_tokens(tmp_path / "me.safetensors", TokenIdentity.textual_inversion("<me>", v))
    assert import_token_bytes(store, (tmp_path / "me.safetensors").read_bytes(), "upload", BASE, D)[0] == ident
    # Another placeholder or another base model is another entry.
    assert import_token_bytes(store, diffusers, "x.safetensors", BASE, D, placeholder="<you>")[0] != ident
    assert import_token_bytes(store, diffusers, "x.safetensors", "c" * 64, D)[0] != ident
    back = stored_tokens(store, ident)
    assert back.placeholder == "<me>" and torch.equal(back.keys[0], v) and torch.equal(back.values[0], v)
    # A1111 safetensors take the placeholder from the upload's file name, reduced to safe characters.
    named, _ = import_token_bytes(store, save({"emb_params": v.clone()}), "../dir/EasyNeg.safetensors", BASE, D)
    assert stored_tokens(store, named).placeholder == "EasyNeg"


def test_listing_describes_token_entries(tmp_path):
    store = IdentityStore(tmp_path)
    g = torch.Generator().manual_seed(1)
    sefi = TokenIdentity("<me>", torch.randn(5, 1, D, generator=g), torch.randn(5, 1, D, generator=g),
                         step_bounds=(800, 600, 400, 200), base_model=BASE, name="sefi")
    ident, _ = store_tokens(store, sefi, BASE)
    row = summary(store.show(ident))
    assert row == {"placeholder": "<me>", "stages": 5, "tokens": 1, "reading": "steps",
                   "step_bounds": [800, 600, 400, 200], "base_model": BASE, "name": "sefi"}
    assert [summary(e) for e in store.list()] == [row]


def test_an_edited_entry_is_reported_and_never_used(tmp_path):
    store = IdentityStore(tmp_path)
    ident, _ = store_tokens(store, TokenIdentity.textual_inversion("<me>", vectors()), BASE)
    path = store.path(ident)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["placeholder"] = "<you>"  # the metadata hash no longer matches
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CorruptEntryError, match="meta_sha256"):
        stored_tokens(store, ident)
    assert store.list() == []
    path.write_bytes(data[:-4] + b"\0\0\0\1")  # the tensors' bytes
    with pytest.raises(CorruptEntryError, match="payload"):
        stored_tokens(store, ident)


@pytest.mark.parametrize("data, words", [
    (save({"<me>": torch.zeros(2, D + 1)}), f"{D + 1}-wide tokens; this text encoder takes {D}"),
    (b"\x80\x04not a torch file", "upload.pt"),
    (save({"a": torch.zeros(1, D), "b": torch.zeros(1, D)}), "upload.pt"),
    (b"", "one non-empty token file"),
])
def test_bad_token_files_are_refused_naming_the_upload(tmp_path, data, words):
    with pytest.raises(PidrtError, match=words.replace(".", r"\.")) as err:
        import_token_bytes(IdentityStore(tmp_path), data, "upload.pt", BASE, D)
    assert "pidrt-tokens-" not in str(err.value)  # never the temporary copy's path
