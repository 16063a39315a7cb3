"""Prompts with a token-identity placeholder: ids, injected embeddings, both tokenizers, the identity's stages."""

from __future__ import annotations

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.models.build import build_text_encoder
from pidrt.models.presets import TINY
from pidrt.models.tokenizer import ClipTokenizer, HashTokenizer
from pidrt.models.tokens import TokenIdentity, TokenText, encode_texts, has_placeholder, placeholder_ids

try:
    from .test_loading import write_tokenizer
except ImportError:
    from test_loading import write_tokenizer

D = TINY.text.hidden_size


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder(TINY, seed=0)


@pytest.fixture(scope="module", params=["hash", "clip"])
def tokenizer(request, tmp_path_factory):
    if request.param == "hash":
        return HashTokenizer(TINY.text)
    folder = tmp_path_factory.mktemp("clip-tokenizer")
    write_tokenizer(folder)
    return ClipTokenizer(folder)


def word_vectors(encoder, tokenizer, text: str) -> torch.Tensor:
    """The token embeddings the encoder gives `text`'s words: a placeholder with these is the text."""
    return encoder.get_input_embeddings().weight[tokenizer.words(text)].detach().clone()


def test_placeholder_with_real_word_embeddings_is_the_plain_prompt(encoder, tokenizer):
    """Injection is exact: vectors equal to the words' own embeddings give the plain prompt's encoding."""
    vectors = word_vectors(encoder, tokenizer, "cat ab")
    texts = ["a cat", TokenText("a photo of <me> by the sea, <ME>!", "<me>", vectors), "x"]
    plain = ["a cat", "a photo of cat ab by the sea, cat ab!", "x"]
    ids, positions = placeholder_ids(tokenizer, texts[1])
    assert torch.equal(ids[[p for p in range(77) if p not in positions]],
                       tokenizer([plain[1]])[0][[p for p in range(77) if p not in positions]])
    assert len(positions) == 2 * len(vectors)  # two occurrences (case-insensitive)
    with torch.no_grad():
        got, ref = encode_texts(encoder, tokenizer, texts), encode_texts(encoder, tokenizer, plain)
    assert torch.equal(got, ref)


def test_ordinary_rows_are_untouched_and_other_vectors_change_the_row(encoder, tokenizer):
    vectors = torch.randn(1, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = encode_texts(encoder, tokenizer, ["a cat", TokenText("a <me>", "<me>", vectors), "b"])
        ref = encode_texts(encoder, tokenizer, ["a cat", "a c", "b"])
    assert torch.equal(got[[0, 2]], ref[[0, 2]])
    assert torch.equal(got[1, :2], ref[1, :2])  # causal: tokens before the placeholder do not see it
    assert (got[1, 2:] - ref[1, 2:]).abs().max() > 1e-3


def test_placeholder_matching():
    assert has_placeholder("a photo of me", "me") and has_placeholder("Me, again", "me")
    assert not has_placeholder("a meadow", "me") and not has_placeholder("a theme", "me")
    assert has_placeholder("a photo of<me>", "<me>")
    with pytest.raises(PidrtError, match="placeholder"):
        has_placeholder("x", " <me>")


def test_placeholder_errors():
    tok = HashTokenizer(TINY.text)
    v = torch.zeros(3, D)
    with pytest.raises(PidrtError, match="does not contain the placeholder"):
        placeholder_ids(tok, TokenText("a photo", "<me>", v))
    with pytest.raises(PidrtError, match="too long"):
        placeholder_ids(tok, TokenText("w " * 73 + "<me>", "<me>", v))
    ids, positions = placeholder_ids(tok, TokenText("<me> " + "w " * 80, "<me>", v))  # words after are cut
    assert positions == [1, 2, 3] and ids[-1] == tok.eos and ids.shape == (77,)
    assert torch.equal(ids[4:], tok(["w " * 80])[0][4:])


def test_token_text_is_a_cache_key():
    v = torch.randn(2, D, generator=torch.Generator().manual_seed(0))
    a, b = TokenText("p <me>", "<me>", v), TokenText("p <me>", "<me>", v.clone())
    assert a == b and hash(a) == hash(b) and len({a, b, "p <me>"}) == 2
    assert TokenText("p <me>", "<me>", v + 1) != a and TokenText("q <me>", "<me>", v) != a


def identity(stages=3, reading="steps", **kw):
    g = torch.Generator().manual_seed(stages)
    k, v = torch.randn(stages, 2, D, generator=g), torch.randn(stages, 2, D, generator=g)
    return TokenIdentity("<me>", k, v, reading, **kw)


def test_stages_by_timestep():
    ident = identity(3, step_bounds=(700, 300))
    assert [ident.stage_at(t) for t in (999, 700, 699, 300, 299, 0)] == [0, 0, 1, 1, 2, 2]
    k, v = ident.texts("a <me>", 1)
    assert torch.equal(k.vectors, ident.keys[1]) and torch.equal(v.vectors, ident.values[1]) and k != v
    ti = TokenIdentity.textual_inversion("<me>", torch.randn(D))
    assert ti.stages == 1 and ti.keys.shape == (1, 1, D) and ti.stage_at(999) == 0
    k, v = ti.texts("a <me>", 0)
    assert k is v  # K = V: encoded once


@pytest.mark.parametrize("kw, match", [
    ({"step_bounds": (300, 700)}, "descending"),
    ({"step_bounds": (700,)}, "descending"),
    ({"reading": "pixels"}, "unknown token reading"),
    ({"reading": "layers"}, "each cross layer"),
    ({"reading": "layers", "layer_stages": (("a", 0), ("b", 3))}, "each cross layer"),
])
def test_bad_identities_are_refused(kw, match):
    kw.setdefault("step_bounds", () if kw.get("reading") else (700, 300))
    reading = kw.pop("reading", "steps")
    with pytest.raises(PidrtError, match=match):
        identity(3, reading, **kw)


def test_identity_checks_against_the_models():
    ident = identity(2, "layers", layer_stages=(("l1", 0), ("l2", 1)))
    ident.check(D, ["l1", "l2"], base_model="abc")
    with pytest.raises(PidrtError, match="wide tokens"):
        ident.check(768)
    with pytest.raises(PidrtError, match="missing"):
        ident.check(D, ["l1", "l2", "l3"])
    with pytest.raises(PidrtError, match="trained for base model"):
        TokenIdentity("<me>", ident.keys, ident.values, "layers", (), ident.layer_stages, base_model="x" * 64).check(
            D, base_model="y" * 64)
