"""Face restoration / super-resolution: detect, align, img2img with an identity, paste back."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pidrt.errors import PidrtError
from pidrt.identity.align import apply_affine
from pidrt.models.adapters import SCAAdapter
from pidrt.models.branches import SCAIdentity
from pidrt.models.presets import TINY
from pidrt.models.conditions import FewTokenCondition, ScaleSchedule
from pidrt.runtime.pipeline import SamplingConfig
from pidrt.runtime.restore import RestoreOptions, paste_back, prepare_face, restore_face, to_uint8

CFG = SamplingConfig(steps=3, guidance=5.0, height=64, width=64)


@pytest.fixture(scope="module")
def low_res(photos) -> np.ndarray:
    """The sample photo at half size: a low-resolution portrait (256 px, the face ~60 px wide)."""
    img = Image.open(io.BytesIO(photos[0])).convert("RGB")
    return np.asarray(img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC))


def sca_condition(pipe, seed=1):
    adapter = SCAAdapter.random(pipe.layers, TINY.unet.cross_attention_dim, seed=seed)
    w = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return FewTokenCondition("sca", SCAIdentity(adapter, adapter.mapping(w)[0]),
                                 SCAIdentity(adapter, adapter.mapping.unconditional()[0]))


@pytest.mark.parametrize("face_only", [False, True], ids=["whole-crop", "face-only"])
def test_pastes_back_only_inside_the_mask(tiny_pipe, low_res, face_only):
    options = RestoreOptions(strength=0.6, upscale=2.0, face_only=face_only)
    out = restore_face(tiny_pipe, CFG, low_res, "a portrait", 3, sca_condition(tiny_pipe), ScaleSchedule(0.8),
                       options=options)
    task = prepare_face(low_res, 64, options)
    assert out.image.shape == task.photo.shape == (low_res.shape[0] * 2, low_res.shape[1] * 2, 3)
    assert np.array_equal(out.weight, task.weight)
    outside = out.weight == 0
    assert outside.any() and (~outside).any()
    assert np.array_equal(out.image[outside], task.photo[outside])  # the photo's own bytes
    changed = np.abs(out.image.astype(int) - task.photo).max(-1)
    assert changed[out.weight > 0.5].max() > 10  # the face was regenerated
    # The pasted region is the face's: its landmarks are inside, the photo's corners are not.
    for x, y in task.face.landmarks5.round().astype(int):
        assert out.weight[y, x] > 0
    assert out.weight[0, 0] == out.weight[-1, -1] == 0
    assert (task.edit.mask is not None) == face_only


def test_face_only_pastes_a_smaller_region(low_res):
    whole, face = (prepare_face(low_res, 64, RestoreOptions(upscale=2.0, face_only=f)) for f in (False, True))
    assert 0 < face.weight.sum() < whole.weight.sum()
    assert face.edit.mask.sum() < 64 * 64 and torch.equal(face.edit.image, whole.edit.image)


def test_alignment_round_trip(low_res):
    """The aligned crop pasted back unchanged lands on the photo (geometry of both warps)."""
    task = prepare_face(low_res, 64, RestoreOptions(upscale=2.0))
    again = paste_back(task, to_uint8(task.edit.image))
    inner = task.weight >= 1
    assert np.abs(again[inner].astype(int) - task.photo[inner]).mean() < 12  # 8x downsampled and back
    lm_crop = apply_affine(task.matrix, task.face.landmarks5)
    assert ((lm_crop > 0) & (lm_crop < 64)).all()


def test_identity_enrolled_from_the_photo_itself(tiny_pipe, low_res, tmp_path):
    from pidrt.identity.enroll import Enroller, EnrollOptions
    from pidrt.identity.store import IdentityStore
    from pidrt.runtime.setup import RuntimeOptions, build_encoders

    buf = io.BytesIO()
    Image.fromarray(low_res).save(buf, format="PNG")
    enroller = Enroller(tiny_pipe, IdentityStore(tmp_path / "store"),
                        build_encoders(tiny_pipe, RuntimeOptions(preset="tiny")))
    cond = enroller.condition(enroller.enroll([buf.getvalue()], EnrollOptions("sca")).identity_id)
    options = RestoreOptions(strength=0.7, upscale=2.0)
    with_id = restore_face(tiny_pipe, CFG, buf.getvalue(), "a portrait", 5, cond, ScaleSchedule(1.0), options=options)
    without = restore_face(tiny_pipe, CFG, buf.getvalue(), "a portrait", 5, options=options)
    assert np.abs(with_id.crop.astype(int) - without.crop).max() > 0


def test_bad_input_is_a_clear_error(tiny_pipe, low_res):
    with pytest.raises(PidrtError, match="no face found"):
        prepare_face(np.full((128, 128, 3), 127, np.uint8), 64)
    with pytest.raises(PidrtError, match="upscale"):
        RestoreOptions(upscale=0.5)
    with pytest.raises(PidrtError, match="square"):
        restore_face(tiny_pipe, SamplingConfig(steps=2, height=64, width=128), low_res, "p")
    with pytest.raises(PidrtError, match="strength"):
        prepare_face(low_res, 64, RestoreOptions(strength=0.0))
