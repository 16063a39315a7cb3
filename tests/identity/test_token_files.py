"""Token-identity files: pidrt's layout round trip, and textual-inversion files in the published layouts.

The published layouts are written here as their tools write them: diffusers' textual_inversion
training script saves `{placeholder_token: learned_embeds}` to learned_embeds.safetensors / .bin;
AUTOMATIC1111's `Embedding.save` torch.saves `string_to_token`, `string_to_param`, `name`, `step`,
`sd_checkpoint`, `sd_checkpoint_name`; A1111 / kohya safetensors embeddings hold `emb_params`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pidrt.errors import FormatError
from pidrt.identity.token_files import load_tokens, save_tokens
from pidrt.models.presets import TINY
from pidrt.models.tokens import TokenIdentity

D = TINY.text.hidden_size


def vectors(n=2, seed=0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path, vec, name="me"):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec.clone())},
                "name": name, "step": 3000, "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5-pruned"}, path)


def test_diffusers_learned_embeds(tmp_path):
    v = vectors(2)
    save_file({"<cat-toy>": v.clone()}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save({"<cat-toy>": v[0].clone()}, tmp_path / "learned_embeds.bin")  # older scripts: one [dim] vector
    for name, expect in (("learned_embeds.safetensors", v), ("learned_embeds.bin", v[:1])):
        ident = load_tokens(tmp_path / name, D)
        assert ident.placeholder == "<cat-toy>" and ident.stages == 1 and ident.reading == "steps"
        assert torch.equal(ident.keys[0], expect) and torch.equal(ident.values[0], expect)


def test_a1111_embeddings(tmp_path):
    v = vectors(3, seed=1)
    write_a1111_pt(tmp_path / "me-3000.pt", v, name="me")
    ident = load_tokens(tmp_path / "me-3000.pt", D)
    assert ident.placeholder == "me" and ident.name == "me" and torch.equal(ident.keys[0], v)
    save_file({"emb_params": v.clone()}, str(tmp_path / "EasyNeg.safetensors"))
    ident = load_tokens(tmp_path / "EasyNeg.safetensors", D, placeholder="<neg>")
    assert ident.placeholder == "<neg>" and ident.name == "EasyNeg" and torch.equal(ident.values[0], v)
    assert load_tokens(tmp_path / "EasyNeg.safetensors", D).placeholder == "EasyNeg"


def test_pidrt_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    steps = TokenIdentity("<me>", torch.randn(5, 1, D, generator=g), torch.randn(5, 1, D, generator=g),
                          step_bounds=(800, 600, 400, 200), base_model="f" * 64, name="sefi")
    layers = TokenIdentity("<me>", torch.randn(2, 1, D, generator=g), torch.randn(2, 1, D, generator=g),
                           "layers", layer_stages=(("a.attn2", 0), ("b.attn2", 1)))
    for ident in (steps, layers):
        save_tokens(tmp_path / "t.safetensors", ident)
        back = load_tokens(tmp_path / "t.safetensors", D)
        assert torch.equal(back.keys, ident.keys) and torch.equal(back.values, ident.values)
        assert (back.placeholder, back.reading, back.step_bounds, back.layer_stages, back.base_model, back.name) == \
               (ident.placeholder, ident.reading, ident.step_bounds, ident.layer_stages, ident.base_model, ident.name)
    save_tokens(tmp_path / "t.safetensors", steps)
    with pytest.raises(FormatError, match="trained for base model"):
        load_tokens(tmp_path / "t.safetensors", D, base_model="0" * 64)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FormatError, match="no such token file"):
        load_tokens(tmp_path / "missing.pt", D)
    save_file({"<a>": vectors(), "<b>": vectors()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(FormatError, match="exactly one embedding"):
        load_tokens(tmp_path / "two.safetensors", D)
    write_a1111_pt(tmp_path / "wide.pt", torch.randn(1, 768))
    with pytest.raises(FormatError, match="768-wide tokens; this text encoder takes 32"):
        load_tokens(tmp_path / "wide.pt", D)
    save_file({"<a>": torch.randn(2, 3, D)}, str(tmp_path / "rank3.safetensors"))
    with pytest.raises(FormatError, match=r"\[tokens, dim\]"):
        load_tokens(tmp_path / "rank3.safetensors", D)
    save_file({"<a>": torch.full((1, D), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(FormatError, match="non-finite"):
        load_tokens(tmp_path / "nan.safetensors", D)
    # A pickle that would run code is not loaded (weights_only=True).
    torch.save({"<a>": vectors(), "hook": torch.nn.Linear(2, 2)}, tmp_path / "code.bin")
    with pytest.raises(FormatError, match="weights-only"):
        load_tokens(tmp_path / "code.bin", D)
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(FormatError, match="unsupported token file type"):
        load_tokens(tmp_path / "x.txt", D)
    save_file({"keys": torch.zeros(1, 1, D), "values": torch.zeros(1, 1, D)}, str(tmp_path / "new.safetensors"),
              metadata={"pidrt_schema": "9", "kind": "tokens", "placeholder": "<me>"})
    with pytest.raises(FormatError, match="schema '9'"):
        load_tokens(tmp_path / "new.safetensors", D)
