"""Mode "retouch" over HTTP: enrollment records the reference path (retouch=true), a generation
body's `mode` and `retouch` object (mask as base64 PNG), the layout image and UNet calls in the
response, and the service's one error shape for what cannot run."""

from __future__ import annotations

import base64
import io

from PIL import Image


def _png(size: int, value: int) -> str:
    out = io.BytesIO()
    Image.new("L", (size, size), value).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def test_retouch_over_http(app, generator, photos, call):
    plain = generator.enroll([photos[1]], "ip").identity_id  # enrolled without its reference path

    async def go(c):
        r = await c.post("/v1/identities", data={"method": "ip", "retouch": "true"},
                         files=[("images", ("face.png", photos[0], "image/png"))])
        assert r.status_code == 201 and r.json()["retouch_reference"] is not None
        ident = r.json()["id"]
        body = {"prompt": "a photo of a man", "identity": ident, "seed": 5, "size": "64x64", "mode": "retouch",
                "retouch": {"subject": "man", "mask": _png(64, 255), "return_layout": True}}
        r = await c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        image = r.json()["data"][0]
        steps = r.json()["request"]["steps"]
        assert base64.b64decode(image["layout_b64_json"])[:4] == b"\x89PNG"
        assert image["unet_calls"]["total"] == 3 * steps
        assert r.json()["request"]["retouch"]["mask"] is True
        for bad, words in [({**body, "retouch": {**body["retouch"], "mask": _png(32, 255)}}, "must be 64x64"),
                           ({**body, "retouch": {**body["retouch"], "mask": "not base64!"}}, "base64"),
                           ({**body, "identity": plain}, "no cached retouch reference"),
                           ({**body, "retouch": {"subject": "man", "layout_steps": 99}}, "layout_steps"),
                           ({**body, "retouch": {"subject": "man", "colour": 1}}, "colour")]:
            r = await c.post("/v1/images/generations", json=bad)
            assert r.status_code == 400 and words in r.json()["error"]["message"], (words, r.text)

    call(app, go)
