"""Mode "retouch" through the Generator (tiny preset, 64x64, 4 steps): the cached reference path
in the identity store, request fields and their 400s, batching by plan, progress, the layout
image and the UNet calls per image; the images equal a direct `retouch()` call."""

from __future__ import annotations

import io

import pytest
import torch

from pidrt.identity.enroll import Encoders, Enroller, EnrollOptions
from pidrt.identity.image_encoder import ClipImageEncoder
from pidrt.identity.retouch_reference import ReferenceStore
from pidrt.identity.store import IdentityStore
from pidrt.models.adapters import EAAAdapter, IPAdapterWeights
from pidrt.models.conditions import ScaleSchedule
from pidrt.models.retouch import swap_layers
from pidrt.runtime.generator import Generator
from pidrt.runtime.pipeline import ImageSpec, SamplingConfig
from pidrt.runtime.requests import Defaults, GenerationRequest, GeneratorConfig, InvalidRequest
from pidrt.runtime.retouch import RetouchSpec, retouch
from pidrt.runtime.retouch_requests import RetouchRequest

STEPS = 4
RETOUCH = dict(layout_steps=1, swap_start=1, reference_start=2, blend_start=2)


@pytest.fixture(scope="module")
def setup(tiny_pipe, tmp_path_factory, photos):
    L = tiny_pipe.layers
    enc = Encoders(ip=IPAdapterWeights.random(L, 32, embeddings_dim=64), image_encoder=ClipImageEncoder.random(64),
                   eaa=EAAAdapter.random(L, 8, 4, 16))
    enroller = Enroller(tiny_pipe, IdentityStore(tmp_path_factory.mktemp("store")), enc)
    gen = Generator(tiny_pipe, enroller, GeneratorConfig(defaults=Defaults(steps=STEPS, guidance=5.0),
                                                        enroll_detector="haar", max_wait_ms=200))
    plain = gen.enroll([photos[0]], "ip").identity_id
    enrolled = gen.enroll([photos[0]], "ip", retouch=True)
    assert enrolled.identity_id == plain and enrolled.retouch_reference is True
    yield gen, enroller, plain
    gen.close()


def _request(identity, **retouch):
    return GenerationRequest("a photo of a man on a beach", identity=identity, seed=7, mode="retouch",
                             retouch=RetouchRequest(**{"subject": "man", **RETOUCH, **retouch}))


def _assert_recomputed(cached, tiny_pipe, enroller, photo, names):
    """The cached path equals the one recorded now from the photo's face crop (inverted, reconstructed)."""
    import numpy as np
    from PIL import Image

    from pidrt.runtime.retouch import reference_path

    opts = EnrollOptions("ip", steps=STEPS, detector="haar")
    crop = enroller._faces([photo], opts, "face512")[0]
    x = torch.from_numpy(np.asarray(Image.fromarray(crop).resize((64, 64), Image.Resampling.LANCZOS),
                                    np.float32) / 255.0).permute(2, 0, 1)[None]
    fresh = reference_path(tiny_pipe, tiny_pipe.encode_image(x), opts.caption, STEPS, names)
    assert torch.allclose(cached.path.latent_t, fresh.latent_t, atol=1e-5)
    for got, want in zip(cached.path.kv, fresh.kv, strict=True):
        for n in names:
            assert torch.allclose(got[n][0], want[n][0], atol=1e-5) and torch.allclose(got[n][1], want[n][1], atol=1e-5)


def test_cached_reference_equals_recomputed(setup, tiny_pipe, photos):
    gen, enroller, ident = setup
    cached = ReferenceStore(enroller.store).load(ident, tiny_pipe.layers)
    names = [layer.name for layer in swap_layers(tiny_pipe.layers, gen.resolve(_request(ident)).retouch.config)]
    assert (cached.steps, cached.resolution, list(cached.layers)) == (STEPS, 64, names)
    _assert_recomputed(cached, tiny_pipe, enroller, photos[0], names)


def test_eaa_enrollment_lends_its_inversion(setup, tiny_pipe, photos, monkeypatch):
    gen, enroller, ident = setup
    calls = []
    unet = tiny_pipe.unet
    monkeypatch.setattr(tiny_pipe, "unet", lambda *args: calls.append(1) or unet(*args))
    eaa = gen.enroll([photos[1]], "eaa", retouch=True, resolution=64)
    monkeypatch.undo()
    assert eaa.created and eaa.retouch_reference and len(calls) == 2 * STEPS  # EAA's own 2T calls, no more
    names = list(ReferenceStore(enroller.store).load(ident, tiny_pipe.layers).layers)
    _assert_recomputed(ReferenceStore(enroller.store).load(eaa.identity_id, tiny_pipe.layers), tiny_pipe, enroller,
                       photos[1], names)


def test_retouch_through_the_generator_equals_retouch(setup, tiny_pipe):
    gen, _, ident = setup
    events = []
    job = gen.submit(_request(ident, return_layout=True), on_event=events.append)
    result = job.result(120)
    image = result.images[0]
    assert image.layout is not None and image.layout[:4] == b"\x89PNG"
    assert image.unet_calls == {"stage1": STEPS, "layout_inversion": STEPS, "stage2": STEPS, "total": 3 * STEPS}
    steps = [e for e in events if e.type == "step"]
    assert [e.step for e in steps] == list(range(1, 3 * STEPS + 1)) and steps[-1].steps == 3 * STEPS
    r = result.request
    spec = RetouchSpec(ImageSpec(r.prompt, 7, "", job.condition, ScaleSchedule(r.scale)), job.retouch.reference,
                       job.retouch.tokens)
    want = retouch(tiny_pipe, SamplingConfig(steps=STEPS, guidance=5.0, height=64, width=64), [spec],
                   r.retouch.config, r.retouch.options)
    assert (image.pixels - want.images[0].clamp(0, 1)).abs().max() < 1e-4
    assert result.request.as_dict()["retouch"]["subject"] == "man"


def test_retouch_requests_batch_by_plan(setup, hold_worker):
    gen, _, ident = setup
    with hold_worker(gen):
        jobs = [gen.submit(_request(ident)), gen.submit(_request(ident, layout_path="recorded")),
                gen.submit(_request(ident)), gen.submit(GenerationRequest("plain", identity=ident, seed=1))]
    results = [j.result(120) for j in jobs]
    assert results[0].batch.id == results[2].batch.id and results[0].batch.requests == 2
    assert len({results[0].batch.id, results[1].batch.id, results[3].batch.id}) == 3
    assert results[1].images[0].unet_calls["total"] == 2 * STEPS and results[3].images[0].unet_calls is None


def test_bad_retouch_requests_are_400s(setup, photos):
    gen, _, ident = setup
    other = gen.enroll([photos[1]], "ip").identity_id  # no retouch reference
    from PIL import Image

    small = io.BytesIO()
    Image.new("L", (32, 32), 255).save(small, format="PNG")
    for request, words in [
        (_request(other), "no cached retouch reference"),
        (_request(ident, mask=small.getvalue()), "must be 64x64"),
        (_request(ident, mask=torch.full((64, 64), 0.5)), "binary"),
        (_request(ident, reference_start=9), "reference_start must be in 0..4"),
        (_request(ident, blend_start=0), "blend_start"),
        (_request(ident, subject="dog"), "not in the prompt"),
        (_request(ident, subject=[90]), "positions"),
        (_request(ident, layout_path="x"), "layout_path"),
        (GenerationRequest("a man", seed=1, mode="retouch", retouch={"subject": "man"}), "needs an identity"),
        (GenerationRequest("a man", identity=ident, mode="paint"), "mode"),
        (GenerationRequest("a man", identity=ident, retouch={"subject": "man"}), "for mode 'retouch'"),
        (GenerationRequest("a man", identity=ident, steps=3, mode="retouch", retouch={"subject": "man"}),
         "recorded for 4 steps"),
        (GenerationRequest("a man", identity=ident, scheduler="dpm++2m", mode="retouch", retouch={"subject": "man"}),
         "ddim"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            gen.submit(request)


def test_corrupt_reference_is_reported_never_used_and_rebuilt(setup, photos, caplog):
    gen, enroller, ident = setup
    path = ReferenceStore(enroller.store).store.path(ident)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidRequest, match="failed verification"):
        gen.submit(_request(ident))
    assert "corrupt" in caplog.text
    assert gen.enroll([photos[0]], "ip", retouch=True).retouch_reference is True  # rebuilt
    assert gen.submit(_request(ident)).result(120).images[0].unet_calls["total"] == 3 * STEPS
