"""The HTTP service over the tiny-preset demo generator: every endpoint, bad input, batching,
jobs with SSE progress, cancellation, overload."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from pidrt.runtime.generator import Generator
from pidrt.runtime.requests import GenerationRequest
from pidrt.serve.app import create_app
from pidrt.serve.service import ClientGone, ServiceConfig


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def sse_events(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in fields:
            out.append({"event": fields["event"], **json.loads(fields["data"])})
    return out


def test_health_ready_and_per_app_metrics(app, generator, call):
    other = create_app(generator)  # a second app: its own Prometheus registry, no clash

    async def go(c):
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200 and "pidrt_queue_depth" in metrics.text
        assert (await c.get("/v1/stats")).json()["backend"] == "torch"

    call(app, go)
    call(other, go)


def test_generation_roundtrip_formats_and_seeds(app, identities, call):
    async def go(c):
        r = await c.post("/v1/images/generations",
                         json={"prompt": "a portrait", "n": 2, "size": "64x64", "seed": 7, "identity": identities[0],
                               "scale": 0.7, "scale_start": 1, "model": "ignored", "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["seed"] for d in body["data"]] == [7, 8] and body["size"] == "64x64"
        assert {d["identity"] for d in body["data"]} == {identities[0]} and body["data"][0]["method"] == "ip"
        assert isinstance(body["created"], int) and body["usage"]["images"] == 2
        assert {"queue_s", "unet_loop_s", "vae_decode_s", "total_s"} <= set(body["timings"])
        image = decode(body["data"][0])
        assert image.format == "PNG" and image.size == (64, 64)

        for fmt, pil in (("jpeg", "JPEG"), ("webp", "WEBP")):
            r = await c.post("/v1/images/generations", json={"prompt": "p", "output_format": fmt, "size": "128x64",
                                                             "output_compression": 80})
            assert r.status_code == 200, r.text
            assert decode(r.json()["data"][0]).format == pil and decode(r.json()["data"][0]).size == (128, 64)

        # No seed: a random one is reported, and asking for it again gives the same image.
        first = (await c.post("/v1/images/generations", json={"prompt": "p"})).json()["data"][0]
        again = (await c.post("/v1/images/generations", json={"prompt": "p", "seed": first["seed"]})).json()["data"][0]
        assert again["b64_json"] == first["b64_json"]

    call(app, go)


def test_identity_endpoints(app, photos, call):
    async def go(c):
        r = await c.post("/v1/identities", files=[("images", ("face.png", photos[1], "image/png")),
                                                  ("images", ("face2.png", photos[0], "image/png"))],
                         data={"method": "ip"})
        assert r.status_code == 201, r.text
        ident = r.json()["id"]
        assert ident.startswith("ip-") and r.json()["method"] == "ip"
        listed = (await c.get("/v1/identities")).json()["data"]
        assert ident in [e["id"] for e in listed]
        shown = (await c.get(f"/v1/identities/{ident}")).json()
        assert shown["id"] == ident and shown["references"] == 2 and shown["bytes"] > 0
        assert (await c.post("/v1/images/generations", json={"prompt": "p", "identity": ident})).status_code == 200
        assert (await c.delete(f"/v1/identities/{ident}")).json()["deleted"] is True
        for resp in (await c.get(f"/v1/identities/{ident}"), await c.delete(f"/v1/identities/{ident}"),
                     await c.post("/v1/images/generations", json={"prompt": "p", "identity": ident})):
            assert resp.status_code == 404 and "unknown identity" in resp.json()["error"]["message"]

    call(app, go)


GEN = "/v1/images/generations"
BAD_GENERATIONS = [
    ({"prompt": "p", "size": "64"}, 400, "size"),
    ({"prompt": "p", "size": "60x64"}, 400, "width"),
    ({"prompt": "p", "size": "64x100"}, 400, "multiple of 8"),
    ({"prompt": "p", "size": "99999x64"}, 400, "width"),
    ({"prompt": "p", "steps": 0}, 400, "steps"),
    ({"prompt": "p", "steps": 5000}, 400, "steps"),
    ({"prompt": "p", "n": 1000}, 400, "n must"),
    ({"prompt": "p", "seed": [1, 2], "n": 3}, 400, "one seed per image"),
    ({"prompt": "p", "guidance": "high"}, 400, "guidance"),
    ({"prompt": "p", "output_format": "gif"}, 400, "output_format"),
    ({"prompt": "p", "response_format": "url"}, 400, "b64_json"),
    ({"prompt": "p", "colour": "red"}, 400, "colour"),
    ({"prompt": 5}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "p", "identity": "ip-0123456789abcdef"}, 404, "unknown identity"),
    ({"prompt": "p", "identity": "not an id"}, 404, "unknown identity"),
    ({"prompt": "p", "method": "dreambooth", "identity": "ip-0123456789abcdef"}, 400, "method"),
    ({"prompt": "x" * 5000}, 400, "characters"),
    ({"prompt": "p", "seed": 2**63 - 1, "n": 2}, 400, "seed"),  # the last image's seed would pass the maximum
    ({"prompt": "p", "seed": 2**63}, 400, "seed"),
    ({"prompt": "p", "scale": -0.5}, 400, "scale"),
    ({"prompt": "p", "identity": "eaa-0123456789abcdef"}, 404, "unknown identity"),  # its steps default reads the store
    ({"prompt": "p", "identity": "sca-0123456789abcdef", "steps": 2}, 404, "unknown identity"),
]


def test_bad_input_gets_a_clear_4xx(app, generator, photos, call):
    small = create_app(generator, ServiceConfig(max_upload_bytes=1000, max_upload_images=2))

    async def go(c):
        for body, status, words in BAD_GENERATIONS:
            for path in (GEN, "/v1/jobs"):
                r = await c.post(path, json=body)
                assert r.status_code == status, (path, body, r.text)
                err = r.json()["error"]
                assert words in err["message"] and err["code"] == status, (body, err)
        r = await c.post(GEN, content=b'{"prompt": "p",', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
        r = await c.post(GEN, content=b"prompt=p", headers={"content-type": "text/plain"})
        assert r.status_code == 400

        enroll = "/v1/identities"
        cases = [
            ({"files": [("images", ("a.png", b"this is not an image", "image/png"))]}, 400, "cannot decode"),
            ({"files": [("images", ("a.png", b"", "image/png"))]}, 400, "empty"),
            ({"files": [("images", ("a.png", photos[0], "image/png"))], "data": {"method": "lora"}}, 400, "method"),
            ({"files": [("images", ("a.png", photos[0], "image/png"))], "data": {"method": "eaa", "steps": "0"}},
             400, "steps"),
            ({"files": [("images", ("a.png", photos[0], "image/png"))], "data": {"steps": "many"}}, 400, "steps"),
            ({"files": [("images", ("me.jpg", b"GIF89a not really", "image/gif"))]}, 400, "me.jpg"),
            ({"data": {"method": "ip"}}, 400, "images"),
        ]
        for kw, status, words in cases:
            r = await c.post(enroll, **kw)
            assert r.status_code == status and words in r.json()["error"]["message"], (kw.get("data"), r.text)
        blank = np.full((256, 256, 3), 200, np.uint8)
        buf = io.BytesIO()
        Image.fromarray(blank).save(buf, format="PNG")
        r = await c.post(enroll, files=[("images", ("blank.png", buf.getvalue(), "image/png"))])
        assert r.status_code == 400 and "face" in r.json()["error"]["message"]

        for r in (await c.get("/v1/jobs/job-nope"), await c.get("/v1/jobs/job-nope/events"),
                  await c.post("/v1/jobs/job-nope/cancel")):
            assert r.status_code == 404 and "no job" in r.json()["error"]["message"]
        metrics = (await c.get("/metrics")).text
        assert 'pidrt_errors_total{type="invalid_request"}' in metrics
        assert 'pidrt_errors_total{type="unknown_identity"}' in metrics

    async def go_small(c):
        r = await c.post("/v1/identities", files=[("images", ("big.png", b"x" * 5000, "image/png"))])
        assert r.status_code == 413 and "big.png is larger than the 1000 byte limit" in r.json()["error"]["message"]
        # Past what any valid upload can be (every file at its limit): refused as the body streams in.
        r = await c.post("/v1/identities", files=[("images", ("big.png", photos[0], "image/png"))])
        assert r.status_code == 413 and "byte limit" in r.json()["error"]["message"]
        r = await c.post("/v1/identities", files=[("images", (f"{i}.png", b"x", "image/png")) for i in range(3)])
        assert r.status_code == 400 and "limit is 2" in r.json()["error"]["message"]

    call(app, go)
    call(small, go_small)


def test_mixed_identity_batch_matches_single_requests(app, generator, identities, call, hold_worker):
    bodies = [{"prompt": "a portrait", "identity": identities[0], "seed": 31},
              {"prompt": "a landscape", "seed": 32, "n": 2},
              {"prompt": "a portrait", "identity": identities[1], "seed": 33, "scale": 0.5}]

    async def go(c):
        # The worker is held until the three requests are queued: then they share one batch.
        with hold_worker(generator):
            posts = asyncio.gather(*(c.post(GEN, json=b) for b in bodies))
            while (await c.get("/v1/stats")).json()["queue_depth"] < len(bodies):
                await asyncio.sleep(0.01)
        batched = await posts
        singles = [await c.post(GEN, json=b) for b in bodies]
        return [r.json() for r in batched], [r.json() for r in singles]

    batched, singles = call(app, go)
    assert len({b["batch"]["id"] for b in batched}) == 1 and batched[0]["batch"]["images"] == 4
    assert all(s["batch"]["requests"] == 1 for s in singles)
    for b, s in zip(batched, singles):
        assert [d["seed"] for d in b["data"]] == [d["seed"] for d in s["data"]]
        for db, ds in zip(b["data"], s["data"]):
            diff = np.abs(np.asarray(decode(db), np.int16) - np.asarray(decode(ds), np.int16)).max()
            assert diff <= 1  # the float images agree to 1e-4 (tests/runtime); PNG rounds to 1/255


def test_job_events_stream_progress_in_order(app, call):
    async def go(c):
        r = await c.post("/v1/jobs", json={"prompt": "p", "steps": 3, "seed": 5})
        assert r.status_code == 202 and r.json()["state"] in ("queued", "running")
        job = r.json()["id"]
        stream = await c.get(f"/v1/jobs/{job}/events")
        assert stream.headers["content-type"].startswith("text/event-stream")
        final = (await c.get(f"/v1/jobs/{job}")).json()
        replay = sse_events((await c.get(f"/v1/jobs/{job}/events")).text)
        return job, sse_events(stream.text), final, replay

    job, events, final, replay = call(app, go)
    assert [(e["event"], e.get("step")) for e in events] == [
        ("queued", None), ("started", None), ("step", 1), ("step", 2), ("step", 3), ("done", None)]
    assert all(e["job_id"] == job for e in events) and [e["seq"] for e in events] == list(range(6))
    assert events[-1]["result"]["data"][0]["seed"] == 5 and decode(events[-1]["result"]["data"][0]).size == (64, 64)
    assert final["state"] == "done" and final["progress"] == {"step": 3, "steps": 3}
    assert final["result"]["data"][0]["b64_json"] == events[-1]["result"]["data"][0]["b64_json"]
    assert replay == events  # a late subscriber gets the same history


def test_job_cancel_stops_it_and_frees_the_worker(app, generator, call):
    async def go(c):
        job = (await c.post("/v1/jobs", json={"prompt": "p", "steps": 80})).json()["id"]
        while (await c.get(f"/v1/jobs/{job}")).json()["state"] != "running":
            await asyncio.sleep(0.01)
        listener = asyncio.ensure_future(c.get(f"/v1/jobs/{job}/events"))
        await asyncio.sleep(0.05)
        cancelled = await c.post(f"/v1/jobs/{job}/cancel")
        events = sse_events((await listener).text)
        again = await c.post(f"/v1/jobs/{job}/cancel")
        after = await c.post(GEN, json={"prompt": "p", "seed": 1})
        return cancelled.json(), events, again.json(), after

    cancelled, events, again, after = call(app, go)
    assert cancelled["state"] == "cancelled" and again["state"] == "cancelled"
    assert events[-1]["event"] == "cancelled" and events[-1]["error"]["type"] == "cancelled"
    assert max(e.get("step", 0) for e in events) < 80
    assert after.status_code == 200  # the worker stopped the cancelled batch between steps and went on


def test_full_queue_answers_429_with_retry_after(generator, call, make_config, hold_worker):
    tight = Generator(generator.pipe, generator.enroller, make_config(max_batch=1, queue_size=1))
    app = create_app(tight, own=True)

    async def go(c):
        with hold_worker(tight):  # busy until one request is queued and the other three refused
            posts = [asyncio.ensure_future(c.post(GEN, json={"prompt": "p", "seed": s})) for s in range(4)]
            while sum(p.done() for p in posts) < 3:
                await asyncio.sleep(0.01)
        rs = await asyncio.gather(*posts)
        return rs, (await c.get("/metrics")).text

    try:
        rs, metrics = call(app, go)
    finally:
        tight.close()
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 429, 429, 429], codes
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "overloaded"
    assert 'pidrt_errors_total{type="overloaded"} 3.0' in metrics


def test_client_disconnect_cancels_the_generation(app, generator):
    service = app.state.service
    before = generator.stats()["outcomes"].get("cancelled", 0)

    async def gone() -> bool:
        return True

    async def go():
        with pytest.raises(ClientGone):
            await service.generate(GenerationRequest("p", steps=60), gone)

    asyncio.run(go())
    assert generator.stats()["outcomes"].get("cancelled", 0) == before + 1


def test_metrics_after_traffic(app, call):
    async def go(c):
        await c.post(GEN, json={"prompt": "p", "n": 2})
        return (await c.get("/metrics")).text

    text = call(app, go)
    for needle in ("pidrt_images_generated_total", "pidrt_batch_images_bucket", 'stage="unet_loop"',
                   'stage="queue"', "pidrt_jobs_running", "pidrt_request_seconds_bucket",
                   'pidrt_requests_total{route="/v1/images/generations",status="200"}'):
        assert needle in text, needle
    images = next(line for line in text.splitlines() if line.startswith("pidrt_images_generated_total"))
    assert float(images.split()[-1]) >= 2
