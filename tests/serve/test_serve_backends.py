"""The HTTP service on every backend: ort and fast give torch's images, readiness waits for the warm-up,
a backend that cannot run stops the server at start, and the CLI answers bad input as HTTP does.

Tolerance for "same images": decoded 8-bit pixels within 2 levels (the float32 latents agree to
1e-4, tests/engines/test_choose.py; rounding to 8 bits can move a pixel by one level).
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from pidrt.engines.options import BackendOptions, Buckets
from pidrt.serve.app import create_app
from pidrt.serve.startup import StartingEngine

PIXEL_TOL = 2
GEN = "/v1/images/generations"


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, engines, make_config, photos):
    """({backend: app} for torch, ort and fast, {method: [two identity ids]}) over one shared store.

    fast runs on CPU as far as it can: float32, no Triton kernels, and graphs "captured" by its
    injectable `EagerCapturer` (the bucket logic and static buffers are real; a replay runs eagerly).
    """
    import torch

    from pidrt.engines.cuda_graphs import EagerCapturer
    from pidrt.engines.fast_torch import FastTorchConfig
    from pidrt.serve.factory import build_generator

    store = tmp_path_factory.mktemp("backends-store")
    config = make_config(max_wait_ms=400, queue_size=16)
    buckets = Buckets.parse("1,2,4@64x64")
    gens = {"torch": build_generator(store, config=config, progress=False)}
    ids = {m: [gens["torch"].enroll([p], m).identity_id for p in photos] for m in ("sca", "ip", "eaa")}
    gens["ort"] = build_generator(store, config=config, progress=False,
                                  backend=BackendOptions(backend="ort", engines=engines, threads=1, buckets=buckets))
    fast = FastTorchConfig(dtype=torch.float32, kernels=False, cuda_graphs=False)
    gens["fast"] = build_generator(store, config=config, progress=False, capturer=EagerCapturer(),
                                   backend=BackendOptions(backend="fast", fast=fast, buckets=buckets))
    yield {name: create_app(g) for name, g in gens.items()}, ids
    for g in gens.values():
        g.close()


def mixed_requests(method: str, ids: dict) -> list[dict]:
    """Two identities at different scales (one from step 1 on) and an image without identity."""
    if method == "none":
        return [{"prompt": "a dog", "seed": 1}, {"prompt": "a cat", "seed": 2, "n": 2}]
    a, b = ids[method]
    return [{"prompt": "a portrait", "seed": 1, "identity": a, "scale": 0.8},
            {"prompt": "a dog", "seed": 2},
            {"prompt": "a face", "seed": 3, "identity": b, "scale": 1.0, "scale_start": 1}]


@pytest.mark.parametrize("backend", ["ort", "fast"])
@pytest.mark.parametrize("method", ["none", "sca", "ip", "eaa"])
def test_server_gives_torch_images_in_mixed_batches(servers, call, method, backend):
    apps, ids = servers
    bodies = mixed_requests(method, ids)

    async def go(c):
        rs = await asyncio.gather(*(c.post(GEN, json={**b, "size": "64x64"}) for b in bodies))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json() for r in rs]

    want, got = call(apps["torch"], go), call(apps[backend], go)
    assert {g["backend"] for g in got} == {backend} and {w["backend"] for w in want} == {"torch"}
    assert max(g["batch"]["requests"] for g in got) > 1  # they shared UNet calls
    for w, g in zip(want, got):
        for wi, gi in zip(w["data"], g["data"]):
            assert (wi["seed"], wi["identity"]) == (gi["seed"], gi["identity"])
            assert np.abs(pixels(wi) - pixels(gi)).max() <= PIXEL_TOL


def test_ort_server_refuses_shapes_outside_its_buckets(servers, call, photos):
    ort_app = servers[0]["ort"]

    async def go(c):
        r = await c.post(GEN, json={"prompt": "p", "size": "128x128"})
        assert r.status_code == 400 and "buckets are 1,2,4@64x64" in r.json()["error"]["message"]
        stats = (await c.get("/v1/stats")).json()
        assert stats["backend"] == "ort" and stats["backend_report"]["lean"]
        r = await c.post("/v1/identities", files=[("images", ("f.png", photos[0], "image/png"))],
                         data={"method": "eaa"})
        assert r.status_code == 400 and "--keep-torch-unet" in r.json()["error"]["message"]

    call(ort_app, go)


def test_readiness_flips_only_after_warm_up(tmp_path, engines, make_config, call):
    from pidrt.serve.factory import build_generator

    reached, release = threading.Event(), threading.Event()

    def hold_warm_up(text: str) -> None:
        if text.startswith("warming"):
            reached.set()
            release.wait(300)

    def build(on_stage):
        return build_generator(tmp_path, config=make_config(max_batch=2), progress=False,
                               on_stage=lambda text: (on_stage(text), hold_warm_up(text)),
                               backend=BackendOptions(backend="ort", engines=engines, methods=("none",), threads=1))

    engine = StartingEngine(build, backend="ort")
    app = create_app(engine, max_batch=2)
    assert reached.wait(300)

    async def loading(c):
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/readyz")
        body = r.json()
        assert r.status_code == 503 and body["status"] == "loading" and body["loading"].startswith("warming none 1@")
        assert body["error"]["type"] == "not_ready" and body["loading"] in body["error"]["message"]
        assert "loading the models" in body["done"] and "opening unet:none" in body["done"]
        r = await c.post(GEN, json={"prompt": "p"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
        assert "warming" in r.json()["error"]["message"]

    call(app, loading)
    release.set()
    assert engine.wait(300)

    async def ready(c):
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["backend"] == "ort"
        stats = (await c.get("/v1/stats")).json()
        assert set(stats["backend_report"]["warmup_s"]) == {"none 1@64x64", "none 2@64x64"}
        assert (await c.post(GEN, json={"prompt": "p", "seed": 1})).status_code == 200

    call(app, ready)
    asyncio.run(engine.close())


def test_a_failed_start_is_reported_and_stops_the_server(call):
    from pidrt.errors import PidrtError

    stopped = []

    def build(on_stage):
        on_stage("loading the models")
        raise PidrtError("the graphs were exported from other weights")

    engine = StartingEngine(build, on_failure=stopped.append)
    app = create_app(engine, max_batch=2)
    assert not engine.wait(60)

    async def go(c):
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "other weights" in r.json()["error"]["message"] and r.json()["error"]["type"] == "not_ready"

    call(app, go)
    assert stopped and "other weights" in stopped[0]


def test_serve_and_generate_fail_at_start_when_the_backend_cannot_run(tmp_path, capsys):
    from pidrt.cli import main

    assert main(["serve", "--backend", "fast", "--store", str(tmp_path)]) == 2
    assert "fast backend runs on a CUDA GPU" in capsys.readouterr().err
    assert main(["generate", "--prompt", "p", "--backend", "fast", "--out", str(tmp_path)]) == 2
    assert "fast backend runs on a CUDA GPU" in capsys.readouterr().err
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["serve", "--backend", "trt", "--store", str(tmp_path)]) == 2
        assert "pip install 'pidrt[trt]'" in capsys.readouterr().err


@pytest.mark.parametrize("args,body", [
    (["--size", "60x60"], {"size": "60x60"}),
    (["--size", "64"], {"size": "64"}),
    (["--steps", "0"], {"steps": 0}),
    (["--n", "9"], {"n": 9}),
    (["--scale", "9"], {"scale": 9.0}),
    (["--identity", "sca-0123456789abcdef", "--method", "ip"], {"identity": "sca-0123456789abcdef", "method": "ip"}),
])
def test_generate_answers_bad_input_as_the_http_api(app, call, capsys, tmp_path, args, body):
    from pidrt.cli import main

    async def go(c):
        r = await c.post(GEN, json={"prompt": "p", **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    message = call(app, go)
    assert main(["generate", "--prompt", "p", "--out", str(tmp_path), *args]) == 2
    assert capsys.readouterr().err.strip() == f"pidrt: error: {message}"
