"""Token identities over HTTP: a token file uploaded with method=tokens, named in a generation by
its id, and the 400s of a request that cannot run (in the service's one error shape)."""

from __future__ import annotations

import io

import torch

from pidrt.models.presets import TINY

D = TINY.text.hidden_size
GEN = "/v1/images/generations"


def a1111_pt(name="<me>", width=D) -> bytes:
    buf = io.BytesIO()
    vec = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name, "step": 1}, buf)
    return buf.getvalue()


def test_token_identity_over_http(app, call, photos):
    async def go(c):
        r = await c.post("/v1/identities", files=[("tokens", ("me.pt", a1111_pt(), "application/octet-stream"))],
                         data={"method": "tokens"})
        assert r.status_code == 201, r.text
        ident = r.json()["id"]
        assert ident.startswith("tokens-") and r.json()["method"] == "tokens"
        shown = (await c.get(f"/v1/identities/{ident}")).json()
        assert shown["tokens"]["placeholder"] == "<me>" and shown["tokens"]["stages"] == 1
        r = await c.post(GEN, json={"prompt": "a photo of <me>", "tokens": ident, "seed": 1, "steps": 1})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["tokens"] == ident and r.json()["request"]["tokens"] == ident
        for body, words in [
            ({"prompt": "a photo", "tokens": ident}, "does not contain the placeholder '<me>'"),
            ({"prompt": "a photo of <me>"}, "names no token identity"),
            ({"prompt": "a photo of <me>", "identity": ident}, "name it in `tokens`"),
        ]:
            r = await c.post(GEN, json=body)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        r = await c.post(GEN, json={"prompt": "a <me>", "tokens": "tokens-0123456789abcdef"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_identity"
        for files, data, words in [
            ([("tokens", ("w.pt", a1111_pt(width=D + 1), "application/octet-stream"))], {"method": "tokens"},
             f"{D + 1}-wide tokens"),
            ([("tokens", ("w.pt", b"\x80\x04junk", "application/octet-stream"))], {"method": "tokens"}, "w.pt"),
            ([("images", ("f.png", photos[0], "image/png"))], {"method": "tokens"}, "one token file"),
            ([("tokens", ("me.pt", a1111_pt(), "application/octet-stream"))], {"method": "ip"}, "face photos"),
        ]:
            r = await c.post("/v1/identities", files=files, data=data)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text

    call(app, go)
