"""Token identities in the torch pipeline: K == V is the prompt's own words, stages switch at the right steps,
mixed batches, textual-inversion files, composition with SCA, the layer-group reading, the text cache."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pidrt.errors import PidrtError
from pidrt.identity.token_files import load_tokens
from pidrt.models.adapters import EAAAdapter, SCAAdapter
from pidrt.models.branches import SCAIdentity
from pidrt.models.presets import TINY
from pidrt.models.tokens import TokenIdentity, TokenText
from pidrt.models.conditions import EAACondition, FewTokenCondition, ScaleSchedule
from pidrt.runtime.inversion import eaa_features, invert_and_record
from pidrt.runtime.pipeline import ImageSpec, SamplingConfig
from pidrt.runtime.text_cache import TextEmbeddingCache

D = TINY.text.hidden_size
CFG = SamplingConfig(steps=4, guidance=5.0, height=64, width=64)  # DDIM timesteps 751, 501, 251, 1


def word_identity(pipe, words: str, placeholder: str = "<me>", **kw) -> TokenIdentity:
    """A textual inversion whose vectors are the token embeddings of `words`."""
    emb = pipe.models.text_encoder.get_input_embeddings().weight
    return TokenIdentity.textual_inversion(placeholder, emb[pipe.models.tokenizer.words(words)].detach().clone(), **kw)


def sefi_identity(stages=3, bounds=(600, 300), seed=0) -> TokenIdentity:
    """Per-stage disentangled K/V token pairs (SeFi-IDE), random."""
    g = torch.Generator().manual_seed(seed)
    return TokenIdentity("<me>", torch.randn(stages, 1, D, generator=g), torch.randn(stages, 1, D, generator=g),
                         step_bounds=bounds)


def test_k_equal_v_identity_is_its_words_bit_for_bit(tiny_pipe):
    ident = word_identity(tiny_pipe, "red cat")
    with_tokens = tiny_pipe.generate(CFG, [ImageSpec("a dog", 1), ImageSpec("a photo of <me>", 2, tokens=ident)])
    plain = tiny_pipe.generate(CFG, [ImageSpec("a dog", 1), ImageSpec("a photo of red cat", 2)])
    assert torch.equal(with_tokens.latents, plain.latents)


def test_stages_switch_at_their_timesteps(tiny_pipe, monkeypatch):
    ident = sefi_identity()
    prompt = "a photo of <me>"
    seen = []
    unet = tiny_pipe.unet

    def recording_unet(x, t, ctx):
        v = tiny_pipe.state.value_context
        seen.append((int(t), ctx[-1].clone(), (ctx if v is None else v)[-1].clone()))
        return unet(x, t, ctx)

    monkeypatch.setattr(tiny_pipe, "unet", recording_unet)
    tiny_pipe.generate(CFG, [ImageSpec("a dog", 1), ImageSpec(prompt, 2, tokens=ident)])
    candidates = tiny_pipe.encode_text([TokenText(prompt, "<me>", t) for t in (*ident.keys, *ident.values)])
    used = []
    for t, k, v in seen:
        dk, dv = ((candidates - row).abs().amax(dim=(1, 2)) for row in (k, v))
        assert dk.min() < 1e-5 and dv.min() < 1e-5
        used.append((t, int(dk.argmin()), int(dv.argmin()) - ident.stages))
    assert used == [(751, 0, 0), (501, 1, 1), (251, 2, 2), (1, 2, 2)]


def test_mixed_batch_equals_single_runs(tiny_pipe):
    specs = [ImageSpec("a dog", 1), ImageSpec("a photo of <me>", 2, tokens=word_identity(tiny_pipe, "red cat")),
             ImageSpec("<me> at the beach", 3, negative_prompt="blurry", tokens=sefi_identity())]
    mixed = tiny_pipe.generate(CFG, specs).latents
    for i, spec in enumerate(specs):
        assert (mixed[i] - tiny_pipe.generate(CFG, [spec]).latents[0]).abs().max() < 1e-4
    plain = tiny_pipe.generate(CFG, [ImageSpec("<me> at the beach", 3, "blurry")]).latents[0]
    assert (mixed[2] - plain).abs().max() > 1e-3


def test_textual_inversion_files_load_and_change_the_image(tiny_pipe, tmp_path):
    v = torch.randn(2, D, generator=torch.Generator().manual_seed(7))
    save_file({"<me>": v.clone()}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v.clone())},
                "name": "<me>", "step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "me.pt")
    out = [tiny_pipe.generate(CFG, [ImageSpec("a photo of <me>", 4, tokens=load_tokens(tmp_path / f, D))]).images
           for f in ("learned_embeds.safetensors", "me.pt")]
    assert torch.equal(out[0], out[1])
    plain = tiny_pipe.generate(CFG, [ImageSpec("a photo of <me>", 4)]).images  # the placeholder as plain text
    assert (out[0] - plain).abs().max() > 1e-3


def test_tokens_compose_with_sca(tiny_pipe):
    adapter = SCAAdapter.random(tiny_pipe.layers, TINY.unet.cross_attention_dim, seed=1)
    w = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = FewTokenCondition("sca", SCAIdentity(adapter, adapter.mapping(w)[0]),
                                 SCAIdentity(adapter, adapter.mapping.unconditional()[0]))
    ident = sefi_identity(seed=3)

    def run(**kw):
        return tiny_pipe.generate(CFG, [ImageSpec("a dog", 1), ImageSpec("<me> smiling", 5, **kw)]).latents

    tokens_only = run(tokens=ident)
    assert torch.equal(run(tokens=ident, condition=cond, schedule=ScaleSchedule(0.0)), tokens_only)
    both = run(tokens=ident, condition=cond, schedule=ScaleSchedule(1.0))
    assert (both[1] - tokens_only[1]).abs().max() > 1e-3
    assert (both[1] - run(condition=cond, schedule=ScaleSchedule(1.0))[1]).abs().max() > 1e-3


def test_tokens_compose_with_eaa_in_every_placement(tiny_pipe):
    """EAA's reference rows ride in front of the batch (recompute) and read their caption, not the tokens."""
    steps = 3
    adapter = EAAAdapter.random(tiny_pipe.layers, latent_size=8, n_levels=4, s_c=16, seed=2)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    inv = invert_and_record(tiny_pipe, tiny_pipe.encode_image(pixels), "a face", steps)
    cond = EAACondition(eaa_features(adapter, tiny_pipe, inv), inv.latent_t, "a face", adapter)
    cross = [layer.name for layer in tiny_pipe.layers if layer.kind == "cross"]
    two = sefi_identity(stages=2, bounds=(500,), seed=5)
    per_layer = TokenIdentity("<me>", two.keys, two.values, "layers",
                              layer_stages=tuple((n, int(n.startswith("up"))) for n in cross))
    for ident in (two, per_layer):
        specs = [ImageSpec("<me> smiling", 1, condition=cond, schedule=ScaleSchedule(0.8), tokens=ident),
                 ImageSpec("a dog", 2)]
        out = {placement: tiny_pipe.generate(SamplingConfig(steps=steps, guidance=5.0, height=64, width=64,
                                                            eaa_placement=placement), specs).latents
               for placement in ("resident", "recompute")}
        assert (out["recompute"] - out["resident"]).abs().max() < 1e-4


def test_layer_group_reading(tiny_pipe):
    cross = [layer.name for layer in tiny_pipe.layers if layer.kind == "cross"]
    steps = sefi_identity(stages=1, bounds=())
    one_group = TokenIdentity("<me>", steps.keys, steps.values, "layers", layer_stages=tuple((n, 0) for n in cross))
    specs = lambda ident: [ImageSpec("a dog", 1), ImageSpec("a <me>", 2, tokens=ident)]  # noqa: E731
    # Every layer reading stage 0 is the step reading with that one stage: the same contexts, gathered per layer.
    assert torch.equal(tiny_pipe.generate(CFG, specs(one_group)).latents, tiny_pipe.generate(CFG, specs(steps)).latents)
    two = sefi_identity(stages=2, bounds=(500,), seed=4)
    down_up = TokenIdentity("<me>", two.keys, two.values, "layers",
                            layer_stages=tuple((n, int(n.startswith("up"))) for n in cross))
    out = tiny_pipe.generate(CFG, specs(down_up)).latents
    for s in (0, 1):
        single = TokenIdentity("<me>", two.keys[s:s + 1], two.values[s:s + 1])
        assert (out[1] - tiny_pipe.generate(CFG, specs(single)).latents[1]).abs().max() > 1e-3
    assert (out[0] - tiny_pipe.generate(CFG, specs(single)).latents[0]).abs().max() < 1e-4  # the plain row
    partial = TokenIdentity("<me>", two.keys, two.values, "layers", layer_stages=((cross[0], 0),))
    with pytest.raises(PidrtError, match="do not match the UNet's cross layers"):
        tiny_pipe.generate(CFG, specs(partial))


def test_bad_token_requests(tiny_pipe):
    with pytest.raises(PidrtError, match="does not contain the token identity's placeholder"):
        tiny_pipe.generate(CFG, [ImageSpec("a photo of me", 1, tokens=sefi_identity())])
    wide = TokenIdentity.textual_inversion("<me>", torch.randn(1, 768))
    with pytest.raises(PidrtError, match="768-wide tokens"):
        tiny_pipe.generate(CFG, [ImageSpec("a <me>", 1, tokens=wide)])


def test_text_cache_keys_token_texts(tiny_pipe):
    cache = TextEmbeddingCache(tiny_pipe.encode_text, 32)
    specs = [ImageSpec("a dog", 1), ImageSpec("<me> at night", 2, tokens=sefi_identity())]
    ref = tiny_pipe.generate(CFG, specs).latents
    first = tiny_pipe.generate(CFG, specs, encode=cache).latents
    misses = cache.stats()["misses"]
    assert misses == 1 + 1 + 6  # the two negatives (both ""), "a dog", 3 stages x (K, V)
    second = tiny_pipe.generate(CFG, specs, encode=cache).latents
    assert cache.stats()["misses"] == misses and torch.equal(first, second)
    assert (first - ref).abs().max() < 1e-4
