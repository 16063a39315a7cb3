"""POST /v1/images/edits (OpenAI's multipart images/edits) and POST /v1/jobs/edits on the tiny
demo server: an inpainting round trip, jobs with SSE, face restoration, and each bad edit's 400
in the one error shape."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pidrt.serve.app import create_app
from pidrt.serve.service import ServiceConfig

SIZE = 64


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def decode(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


PHOTO = png((np.random.default_rng(1).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
_alpha = np.full((SIZE, SIZE, 4), 255, np.uint8)
_alpha[8:40, 16:56, 3] = 0  # transparent = repaint
MASK = png(_alpha)


def files(image=PHOTO, mask=MASK) -> dict:
    out = {"image": ("photo.png", image, "image/png")}
    if mask is not None:
        out["mask"] = ("mask.png", mask, "image/png")
    return out


def test_edit_roundtrip_and_job_stream(app, call):
    from test_http import sse_events

    async def go(c):
        edit = await c.post("/v1/images/edits", files=files(),
                            data={"prompt": "a portrait", "n": "2", "size": f"{SIZE}x{SIZE}", "seed": "7",
                                  "strength": "1.0", "response_format": "b64_json"})
        job = await c.post("/v1/jobs/edits", files=files(mask=None),
                           data={"prompt": "a portrait", "seed": "9", "strength": "0.5"})
        assert job.status_code == 202, job.text
        stream = await c.get(job.json()["events_url"])
        return edit, sse_events(stream.text)

    edit, events = call(app, go)
    assert edit.status_code == 200, edit.text
    body = edit.json()
    assert [d["seed"] for d in body["data"]] == [7, 8] and all(decode(d).shape == (SIZE, SIZE, 3) for d in body["data"])
    assert body["request"]["edit"] == {"strength": 1.0, "start_step": 0, "mask": True, "restore_face": False,
                                       "upscale": 1.0, "face_only": False, "inpainting": None}
    assert "vae_encode_s" in body["timings"]
    assert [e["event"] for e in events] == ["queued", "started", "step", "done"]  # strength 0.5 of 2 steps: 1 step
    assert events[-1]["result"]["request"]["edit"]["start_step"] == 1


def test_restore_face_returns_the_photo(app, photos, call):
    async def go(c):
        return await c.post("/v1/images/edits", files=files(photos[0], None),
                            data={"prompt": "a portrait", "restore_face": "true", "strength": "0.5", "seed": "3"})

    r = call(app, go)
    assert r.status_code == 200, r.text
    photo = np.asarray(Image.open(io.BytesIO(photos[0])).convert("RGB"))
    item = r.json()["data"][0]
    assert decode(item).shape == photo.shape and (item["width"], item["height"]) == (photo.shape[1], photo.shape[0])


@pytest.mark.parametrize("kw, data, message", [
    (dict(mask=png(np.zeros((32, 32, 3), np.uint8))), {}, "the mask is 32x32 but the image is 64x64"),
    (dict(mask=png(np.full((SIZE, SIZE, 4), 255, np.uint8))), {}, "nothing to repaint"),
    ({}, {"strength": "0"}, r"strength must be a number in (0, 1]"),
    ({}, {"strength": "1.5"}, r"strength must be a number in (0, 1]"),
    ({}, {"strength": "0.25"}, "runs no step out of 2"),
    ({}, {"strength": "strong"}, "strength: Input should be a valid number"),
    (dict(mask=None), {"restore_face": "true"}, "no face found"),
    ({}, {"inpainting": "model"}, "inpainting='model' needs an SD1.5 inpainting UNet"),
    (dict(image=b"junk"), {}, "cannot decode the image"),
    (dict(image=b""), {}, "the image is empty"),
], ids=["mask-size", "empty-mask", "strength-0", "strength-1.5", "no-step", "not-a-number", "no-face",
        "no-inpainting-model", "junk-image", "empty-image"])
def test_bad_edits_get_400(app, call, kw, data, message):
    async def go(c):
        return await c.post("/v1/images/edits", files=files(**kw), data={"prompt": "p", **data})

    r = call(app, go)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request" and error["code"] == 400


def test_edit_upload_limit(generator, call):
    small = create_app(generator, ServiceConfig(max_upload_bytes=len(PHOTO) - 1))

    async def go(c):
        return await c.post("/v1/images/edits", files=files(mask=None), data={"prompt": "p"})

    r = call(small, go)
    assert r.status_code == 413 and r.json()["error"]["type"] == "upload_too_large"


def test_generations_take_no_edit_fields(app, call):
    """Edits come as uploads only: a JSON path would make the server read its own files."""
    async def go(c):
        return await c.post("/v1/images/generations", json={"prompt": "p", "init_image": "/etc/hostname"})

    r = call(app, go)
    assert r.status_code == 400 and r.json()["error"]["param"] == "init_image"
