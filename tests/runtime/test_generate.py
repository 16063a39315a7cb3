"""`pidrt generate`: torch and ort write the same images; PNG parameters chunk; JSON sidecar; --face
enrolls once (the second run reuses the stored entry).

"Same images": decoded 8-bit pixels within 2 levels (float32 latents agree to 1e-4 on both
backends, tests/engines/test_choose.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pidrt.cli import main

PIXEL_TOL = 2
COMMON = ["--prompt", "a portrait", "--negative-prompt", "blurry", "--steps", "2", "--guidance", "5",
          "--size", "64x64", "--seed", "11", "--n", "2", "--scale", "0.8", "--detector", "haar", "--no-progress"]


@pytest.fixture(scope="module")
def face(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("faces") / "face.png"
    path.write_bytes(photos[0])
    return path


def run(capsys, *args) -> dict:
    assert main(["generate", *COMMON, *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "sca", "ip", "eaa"])
def test_ort_writes_torch_images(tmp_path, capsys, engines, face, method):
    store = str(tmp_path / "store")
    who = [] if method == "none" else ["--face", str(face), "--method", method]
    torch_out = run(capsys, "--backend", "torch", "--store", store, "--out", str(tmp_path / "torch"), *who)
    sidecar = json.loads(open(torch_out["sidecar"]).read())
    if method != "none":
        assert sidecar["enrolled"]["created"] and sidecar["identity"].startswith(method)
        # The engine server serves the stored identity (EAA: enrolled above on the torch UNet).
        who = ["--identity", sidecar["identity"]]
    ort_out = run(capsys, "--backend", "ort", "--engines", str(engines), "--threads", "1", "--store", store,
                  "--out", str(tmp_path / "ort"), *who)
    assert torch_out["seeds"] == ort_out["seeds"] == [11, 12] and ort_out["backend"] == "ort"
    for a, b in zip(torch_out["images"], ort_out["images"]):
        assert np.abs(read(a) - read(b)).max() <= PIXEL_TOL


def test_png_parameters_sidecar_and_enrollment_reuse(tmp_path, capsys, face):
    store = str(tmp_path / "store")
    first = run(capsys, "--face", str(face), "--method", "ip", "--store", store, "--out", str(tmp_path / "one.png"))
    assert [p.rsplit("/", 1)[-1] for p in first["images"]] == ["one-0.png", "one-1.png"]
    assert first["sidecar"].endswith("one.json")
    meta = json.loads(open(first["sidecar"]).read())
    ident = meta["identity"]
    assert meta["enrolled"] == {"id": ident, "created": True, "seconds": meta["enrolled"]["seconds"]}
    assert (meta["prompt"], meta["negative_prompt"], meta["seeds"], meta["method"], meta["scale"], meta["steps"],
            meta["backend"], meta["device"]) == ("a portrait", "blurry", [11, 12], "ip", 0.8, 2, "torch", "cpu")
    assert {"text_encode_s", "unet_loop_s", "vae_decode_s", "total_s"} <= set(meta["timings"])
    assert [i["seed"] for i in meta["images"]] == [11, 12]
    text = Image.open(first["images"][1]).text["parameters"]
    lines = text.splitlines()
    assert lines[0] == "a portrait" and lines[1] == "Negative prompt: blurry"
    fields = dict(f.split(": ", 1) for f in lines[2].split(", "))
    assert fields["Steps"] == "2" and fields["Sampler"] == "DDIM" and fields["CFG scale"] == "5.0"
    assert fields["Seed"] == "12" and fields["Size"] == "64x64" and fields["Backend"] == "torch"
    assert fields["Identity"] == ident and fields["Identity method"] == "ip" and fields["Identity scale"] == "0.8"
    # The same photos again: the stored entry is reused, and the same seeds give the same images.
    again = run(capsys, "--face", str(face), "--method", "ip", "--store", store, "--out", str(tmp_path / "dir"))
    meta2 = json.loads(open(again["sidecar"]).read())
    assert meta2["enrolled"]["id"] == ident and not meta2["enrolled"]["created"]
    assert [p.rsplit("/", 1)[-1] for p in again["images"]] == ["pidrt-11.png", "pidrt-12.png"]
    assert np.array_equal(read(first["images"][0]), read(again["images"][0]))
