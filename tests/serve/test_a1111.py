"""POST /sdapi/v1/txt2img: AUTOMATIC1111's request and response shape over the same generator."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image

URL = "/sdapi/v1/txt2img"


def test_txt2img_answers_in_a1111_shape(app, identities, call):
    async def go(c):
        plain = await c.post(URL, json={"prompt": "a portrait", "negative_prompt": "blurry", "steps": 2,
                                        "cfg_scale": 6.5, "seed": 11, "width": 64, "height": 64, "batch_size": 2,
                                        "sampler_name": "DPM++ 2M", "send_images": True, "save_images": False,
                                        "do_not_save_grid": True, "override_settings": {}, "restore_faces": False})
        ident = await c.post(URL, json={"prompt": "a portrait", "seed": 3, "identity": identities[0], "scale": 0.5,
                                        "sampler_name": "DDIM"})
        random = await c.post(URL, json={"prompt": "p", "seed": -1, "send_images": False})
        openai = await c.post("/v1/images/generations", json={"prompt": "a portrait", "seed": 3,
                                                               "identity": identities[0], "scale": 0.5})
        return plain, ident, random, openai

    plain, ident, random, openai = call(app, go)
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    assert len(body["images"]) == 2
    for b64 in body["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert image.format == "PNG" and image.size == (64, 64)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12] and info["seed"] == 11 and info["sampler_name"] == "DPM++ 2M"
    assert (info["steps"], info["cfg_scale"], info["width"], info["height"]) == (2, 6.5, 64, 64)
    assert info["negative_prompt"] == "blurry" and len(info["infotexts"]) == 2 and "Seed: 12" in info["infotexts"][1]
    assert body["parameters"]["prompt"] == "a portrait" and body["parameters"]["batch_size"] == 2

    assert ident.status_code == 200, ident.text
    extra = json.loads(ident.json()["info"])["extra_generation_params"]
    assert extra["pidrt_identity"] == identities[0] and extra["pidrt_method"] == "ip" and extra["pidrt_scale"] == 0.5
    # The same request through the OpenAI-shaped endpoint gives the same image.
    assert ident.json()["images"][0] == openai.json()["data"][0]["b64_json"]

    assert random.status_code == 200 and random.json()["images"] == []
    assert 0 <= json.loads(random.json()["info"])["seed"] < 2**32


BAD = [
    ({"prompt": "p", "sampler_name": "Euler a"}, "sampler_name"),
    ({"prompt": "p", "enable_hr": True}, "enable_hr"),
    ({"prompt": "p", "restore_faces": True, "tiling": True}, "restore_faces, tiling"),
    ({"prompt": "p", "subseed_strength": 0.3}, "subseed_strength"),
    ({"prompt": "p", "alwayson_scripts": {"controlnet": {}}}, "alwayson_scripts"),
    ({"prompt": "p", "scheduler": "Karras"}, "scheduler"),
    ({"prompt": "p", "batch_size": 0}, "batch_size"),
    ({"prompt": "p", "batch_size": 5, "n_iter": 2}, "n must"),
    ({"prompt": "p", "width": 60}, "width"),
    ({"prompt": "p", "steps": 0}, "steps"),
    ({"prompt": "p", "seed": "x"}, "seed"),
    ({"prompt": "p", "identity": "ip-0123456789abcdef"}, "unknown identity"),
]


def test_txt2img_refuses_what_it_cannot_honour(app, call):
    async def go(c):
        return [(await c.post(URL, json=body), words) for body, words in BAD]

    for r, words in call(app, go):
        assert r.status_code in (400, 404), r.text
        err = r.json()["error"]
        assert words in err["message"] and err["code"] == r.status_code, err
