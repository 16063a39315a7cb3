"""Edits through the Generator: request fields -> the images' Edit, batches shared with plain
generations, face restoration pasted back, inpainting variants, and a lean ORT inpainting server
vs torch.

Tolerances: a request's images against the reference Pipeline run alone (another batch
composition) within 1e-4 in [0, 1] (float32; BLAS takes other paths for other batch sizes); ORT vs
torch within 1e-4 as tests/engines/test_choose.py (float32 graphs, explicit attention).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pidrt.engines.options import BackendOptions, Buckets
from pidrt.models.build import build_random
from pidrt.models.presets import TINY, TINY_INPAINTING
from pidrt.runtime.edit_files import read_edit
from pidrt.runtime.generator import Generator
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig
from pidrt.runtime.requests import Defaults, GenerationRequest, GeneratorConfig, InvalidRequest
from pidrt.runtime.restore import RestoreOptions, prepare_face

STEPS, SIZE, TOL = 3, 64, 1e-4
CONFIG = GeneratorConfig(defaults=Defaults(steps=STEPS, guidance=5.0, width=SIZE, height=SIZE),
                         enroll_detector="haar", max_wait_ms=0, max_batch=4)


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


PHOTO = png((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
_alpha = np.full((SIZE, SIZE, 4), 255, np.uint8)
_alpha[16:48, 8:40, 3] = 0  # OpenAI's mask: transparent = repaint
MASK = png(_alpha)


@pytest.fixture(scope="module")
def gen():
    g = Generator(Pipeline(build_random(TINY)), None, CONFIG)
    yield g
    g.close()


@pytest.fixture(scope="module")
def low_res(photos) -> bytes:
    img = Image.open(io.BytesIO(photos[0])).convert("RGB")
    return png(np.asarray(img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC)))


def test_edits_share_a_batch_with_plain_generations(gen, hold_worker):
    with hold_worker(gen):
        jobs = [gen.submit(GenerationRequest("a portrait", seed=1)),
                gen.submit(GenerationRequest("a portrait", seed=2, init_image=PHOTO, mask=MASK)),
                gen.submit(GenerationRequest("a portrait", seed=3, init_image=PHOTO, strength=0.7))]
    results = [j.result(120) for j in jobs]
    assert {r.batch.id for r in results} == {results[0].batch.id} and results[0].batch.requests == 3
    assert all("vae_encode_s" in r.timings for r in results)
    assert results[1].request.as_dict()["edit"] == {"strength": 1.0, "start_step": 0, "mask": True,
                                                    "restore_face": False, "upscale": 1.0, "face_only": False,
                                                    "inpainting": None}
    assert results[2].request.edit.start == 1  # diffusers: int(3 * 0.7) = 2 steps run
    light = results[2].without_tensors().request  # what job records keep and Ray ships: no pixels
    assert light.edit == results[2].request.edit.summary() and light.as_dict() == results[2].request.as_dict()
    # Each equals the reference pipeline run alone on the same Edit.
    cfg = SamplingConfig(steps=STEPS, guidance=5.0, height=SIZE, width=SIZE)
    edits = [None, read_edit(PHOTO, MASK, 1.0), read_edit(PHOTO, None, 0.7)]
    for seed, (result, edit) in enumerate(zip(results, edits), 1):
        want = gen.pipe.generate(cfg, [ImageSpec("a portrait", seed, edit=edit)]).images[0]
        assert (result.images[0].pixels - want).abs().max() <= TOL


@pytest.mark.parametrize("fields, message", [
    (dict(init_image=PHOTO, mask=png(np.zeros((32, 32, 3), np.uint8))), "the mask is 32x32 but the image is 64x64"),
    (dict(init_image=PHOTO, mask=png(np.zeros((SIZE, SIZE, 3), np.uint8))), "nothing to repaint"),
    (dict(init_image=PHOTO, strength=0.0), r"strength must be a number in \(0, 1\]"),
    (dict(init_image=PHOTO, strength=1.5), r"strength must be a number in \(0, 1\]"),
    (dict(init_image=PHOTO, strength=0.2), "runs no step out of 3"),
    (dict(init_image=PHOTO, restore_face=True), "no face found"),
    (dict(init_image=b"not an image"), "cannot decode the image"),
    (dict(mask=MASK), "give an init image"),
    (dict(init_image=PHOTO, upscale=2.0), "restore_face only"),
    (dict(init_image=png(np.zeros((600, 600, 3), np.uint8)), restore_face=True, upscale=8.0), "the limit is 16 megap"),
    (dict(init_image=PHOTO, inpainting="blend"), "needs a mask"),
    (dict(init_image=PHOTO, mask=MASK, inpainting="model"), "needs an SD1.5 inpainting UNet and this model's is a base one; load one"),
    (dict(init_image=PHOTO, mode="retouch"), "mode 'retouch' generates from noise; it takes no init_image"),
], ids=["mask-size", "empty-mask", "strength-0", "strength-1.5", "no-step", "no-face", "bad-file", "mask-only",
        "upscale-without-restore", "restored-too-large", "variant-without-mask", "no-inpainting-model",
        "retouch-with-init-image"])
def test_bad_edits_are_invalid_requests(gen, fields, message):
    with pytest.raises(InvalidRequest, match=message):
        gen.submit(GenerationRequest("a portrait", **fields))


def test_restore_face_pastes_back_only_inside_the_mask(gen, low_res):
    result = gen.generate(GenerationRequest("a portrait", seed=4, init_image=low_res, restore_face=True, upscale=2.0,
                                            strength=0.7), timeout=120)
    task = prepare_face(low_res, SIZE, RestoreOptions(strength=0.7, upscale=2.0, detector="haar"))
    image = result.images[0]
    out = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
    assert out.shape == task.photo.shape and (image.width, image.height) == (out.shape[1], out.shape[0])
    outside = task.weight == 0
    assert outside.any() and (~outside).any()
    assert np.array_equal(out[outside], task.photo[outside])  # the photo's own bytes
    assert np.abs(out.astype(int) - task.photo)[task.weight > 0.5].max() > 10  # the face was regenerated
    assert torch.equal((image.pixels * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(out.copy()))


def test_inpainting_server_runs_plain_and_masked_requests():
    g = Generator(Pipeline(build_random(TINY_INPAINTING)), None, CONFIG)
    try:
        plain = g.generate(GenerationRequest("a portrait", seed=1, steps=2), timeout=120)
        edit = g.generate(GenerationRequest("a portrait", seed=1, steps=2, init_image=PHOTO, mask=MASK,
                                            inpainting="model"), timeout=120)
        assert plain.images[0].pixels.shape == edit.images[0].pixels.shape == (3, SIZE, SIZE)
        with pytest.raises(InvalidRequest, match="does not latent-blend"):
            g.submit(GenerationRequest("a portrait", init_image=PHOTO, mask=MASK, inpainting="blend"))
    finally:
        g.close()


def test_ort_inpainting_server_matches_torch():
    """A lean ort server with an inpainting UNet (the torch VAE encoder kept, the decoder dropped):
    plain, img2img and masked requests give the torch Generator's images."""
    from pidrt.engines.choose import open_backend
    from pidrt.export.testing import tiny_export

    # The folder tests/engines/test_edit_runners.py exports (one export per process).
    engines = tiny_export("none", kinds=("unet", "text_encoder", "vae_decoder", "vae_encoder"),
                          preset="tiny-inpainting")
    options = BackendOptions(backend="ort", engines=engines, threads=1, methods=("none",),
                             buckets=Buckets.parse(f"4@{SIZE}x{SIZE}"), warmup=False)
    opened = open_backend(options, Pipeline(build_random(TINY_INPAINTING)), max_batch=4, progress=False)
    ort = Generator(opened.pipeline, None, CONFIG, backend=opened.name, admit=opened.admit)
    ref = Generator(Pipeline(build_random(TINY_INPAINTING)), None, CONFIG)
    try:
        assert ort.backend == "ort" and ort.pipe.models.vae.decoder is None  # lean: the encoder stays
        requests = [GenerationRequest("a portrait", seed=5, n=2, init_image=PHOTO, mask=MASK, strength=0.7),
                    GenerationRequest("a portrait", seed=6, init_image=PHOTO, strength=0.7),
                    GenerationRequest("a portrait", seed=7)]
        for request in requests:
            got, want = ort.generate(request, timeout=120), ref.generate(request, timeout=120)
            for a, b in zip(got.images, want.images):
                assert (a.latents - b.latents).abs().max() <= TOL and (a.pixels - b.pixels).abs().max() <= TOL
    finally:
        ort.close()
        ref.close()
