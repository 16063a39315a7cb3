"""Token identities through the Generator: named by id, mixed batches with plain prompts and an
IP-Adapter identity, the same images as the pipeline given the identity, on torch and on
onnxruntime, and every refusal made at admission (before the request queues).

The ORT graphs are tests/engines/test_token_runners.py's (same kinds: one export per session)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from pidrt.engines.pipeline_adapter import RunnerPipeline
from pidrt.engines.runners import open_runners
from pidrt.export.testing import tiny_export
from pidrt.identity.enroll import Encoders, Enroller
from pidrt.identity.image_encoder import ClipImageEncoder
from pidrt.identity.store import IdentityStore, UnknownIdentityError
from pidrt.identity.token_store import store_tokens
from pidrt.models.adapters import IPAdapterWeights
from pidrt.models.build import build_random
from pidrt.models.conditions import ScaleSchedule
from pidrt.models.presets import TINY
from pidrt.models.tokens import TokenIdentity
from pidrt.runtime.generator import Generator
from pidrt.runtime.pipeline import ImageSpec, SamplingConfig
from pidrt.runtime.requests import Defaults, GenerationRequest, GeneratorConfig, InvalidRequest

D = TINY.text.hidden_size
CONFIG = GeneratorConfig(defaults=Defaults(steps=2, guidance=5.0), enroll_detector="haar", max_wait_ms=0)
SAMPLING = SamplingConfig(steps=2, guidance=5.0, height=64, width=64)  # DDIM timesteps 501, 1: both stages


def sefi(seed=0, reading="steps", **kw) -> TokenIdentity:
    g = torch.Generator().manual_seed(seed)
    kw.setdefault("step_bounds", (500,) if reading == "steps" else ())
    return TokenIdentity("<me>", torch.randn(2, 1, D, generator=g), torch.randn(2, 1, D, generator=g), reading, **kw)


@pytest.fixture(scope="module")
def setup(tiny_pipe, tmp_path_factory, photos):
    L = tiny_pipe.layers
    enc = Encoders(ip=IPAdapterWeights.random(L, 32, embeddings_dim=64), image_encoder=ClipImageEncoder.random(64))
    enroller = Enroller(tiny_pipe, IdentityStore(tmp_path_factory.mktemp("token-store")), enc)
    gen = Generator(tiny_pipe, enroller, CONFIG)
    ti = gen.enroll([save({"<cat>": torch.randn(2, D, generator=torch.Generator().manual_seed(5))})], "tokens",
                    names=("learned_embeds.safetensors",)).identity_id
    ids = {"ti": ti, "sefi": store_tokens(enroller.store, sefi(), enroller.base_fingerprint())[0],
           "ip": gen.enroll([photos[0]], "ip").identity_id}
    yield gen, enroller, ids
    gen.close()


REQUESTS = [GenerationRequest("a dog", seed=1), GenerationRequest("a photo of <cat>", tokens="ti", seed=2),
            GenerationRequest("<me> at the beach", tokens="sefi", identity="ip", seed=3)]


def run_batch(gen, ids, hold_worker, requests=REQUESTS):
    """`requests` in one batch (queued behind a held worker)."""
    named = [GenerationRequest(r.prompt, identity=ids.get(r.identity), tokens=ids.get(r.tokens), seed=r.seed)
             for r in requests]
    with hold_worker(gen):
        jobs = [gen.submit(r) for r in named]
    results = [j.result(120) for j in jobs]
    assert {r.batch.requests for r in results} == {len(requests)}
    return torch.stack([r.images[0].pixels for r in results])


def reference(pipe, enroller, gen, ids):
    """The pipeline given the same identities directly."""
    ti, me = enroller.condition(ids["ti"]), enroller.condition(ids["sefi"])
    ip = enroller.condition(ids["ip"])
    scale = ScaleSchedule(gen.scales["ip"])
    specs = [ImageSpec("a dog", 1), ImageSpec("a photo of <cat>", 2, tokens=ti),
             ImageSpec("<me> at the beach", 3, condition=ip, schedule=scale, tokens=me),
             ImageSpec("<me> at the beach", 3, tokens=me)]
    return pipe.generate(SAMPLING, specs).images


def test_mixed_batch_on_torch_and_ort_equals_the_pipeline(setup, tiny_pipe, hold_worker):
    gen, enroller, ids = setup
    got = run_batch(gen, ids, hold_worker)
    ref = reference(tiny_pipe, enroller, gen, ids)
    assert (got - ref[:3]).abs().max() < 1e-4
    assert (ref[3] - ref[2]).abs().max() > 1e-3  # the IP identity acts beside the tokens
    assert gen.text_cache.stats()["entries"] >= 5  # token texts cached like prompts
    # The same store served by an exported UNet (the module's other graphs' kinds: one export).
    folder = tiny_export("none", kinds=("unet", "text_encoder", "vae_decoder", "vae_encoder"))
    ort_pipe = RunnerPipeline(build_random(TINY, seed=0), open_runners(folder, "ort", "none", threads=1))
    plain = [*REQUESTS[:2], GenerationRequest("<me> at the beach", tokens="sefi", seed=3)]
    with Generator(ort_pipe, Enroller(ort_pipe, enroller.store, enroller.encoders), CONFIG, "ort") as ort:
        assert (run_batch(ort, ids, hold_worker, plain) - ref[[0, 1, 3]]).abs().max() < 1e-4
        # P+'s per-layer reading: refused at admission on graphs, served by torch.
        cross = [layer.name for layer in tiny_pipe.layers if layer.kind == "cross"]
        layered = sefi(1, "layers", layer_stages=tuple((n, int(n.startswith("up"))) for n in cross))
        lid = store_tokens(enroller.store, layered, enroller.base_fingerprint())[0]
        with pytest.raises(InvalidRequest, match="torch backend only"):
            ort.submit(GenerationRequest("a <me>", tokens=lid, steps=1))
    assert gen.generate(GenerationRequest("a <me>", tokens=lid, steps=1, seed=0)).images[0].pixels.isfinite().all()


def test_refusals_at_admission(setup):
    gen, enroller, ids = setup
    for request, words in [
        (GenerationRequest("a photo", tokens=ids["ti"]), "does not contain the placeholder '<cat>'"),
        (GenerationRequest("a photo of <cat>"), "names no token identity"),
        (GenerationRequest("<cat> and <dog>", tokens=ids["ti"]), "'<dog>' but token identity"),
        (GenerationRequest("a <cat>", identity=ids["ti"]), "name it in `tokens`"),
        (GenerationRequest("a <cat>", tokens=ids["ip"]), "put it in `identity`"),
        (GenerationRequest("a <cat>", tokens=["x"]), "one token identity id"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            gen.submit(request)
    with pytest.raises(UnknownIdentityError):
        gen.submit(GenerationRequest("a <cat>", tokens="tokens-0123456789abcdef"))
    with pytest.raises(InvalidRequest, match=f"{D + 1}-wide tokens"):
        gen.enroll([save({"<w>": torch.zeros(1, D + 1)})], "tokens")
    with pytest.raises(InvalidRequest, match="do not apply to token identities"):
        gen.enroll([save({"<w>": torch.zeros(1, D)})], "tokens", steps=4)
