"""Enrollment on a real photo: each method, cache hits, multi-reference, corruption, keys."""

from __future__ import annotations

import pytest
import torch

from pidrt.errors import PidrtError
from pidrt.identity.enroll import Enroller, EnrollOptions
from pidrt.identity.store import IdentityStore
from pidrt.models.conditions import EAACondition, FoldedCondition, ScaleSchedule
from pidrt.runtime.demo import sample_face_photo
from pidrt.runtime.pipeline import ImageSpec, SamplingConfig
from pidrt.runtime.setup import RuntimeOptions, build_encoders

STEPS = 2


@pytest.fixture(scope="module")
def enroller(tmp_path_factory, tiny_pipe):
    encoders = build_encoders(tiny_pipe, RuntimeOptions(preset="tiny"))
    return Enroller(tiny_pipe, IdentityStore(tmp_path_factory.mktemp("store")), encoders)


@pytest.fixture(scope="module")
def photo():
    return sample_face_photo()[0]


@pytest.mark.parametrize("method", ["sca", "ip", "eaa"])
def test_enroll_each_method_then_generate(enroller, photo, method):
    first = enroller.enroll([photo], EnrollOptions(method, steps=STEPS))
    again = enroller.enroll([photo], EnrollOptions(method, steps=STEPS))
    assert first.created and not again.created and first.identity_id == again.identity_id
    assert first.identity_id.startswith(method + "-")
    cond = enroller.condition(first.identity_id)
    assert isinstance(cond, EAACondition if method == "eaa" else FoldedCondition)
    config = SamplingConfig(steps=STEPS, guidance=5.0, height=64, width=64)
    with_id = enroller.pipe.generate(config, [ImageSpec("p", 1, condition=cond, schedule=ScaleSchedule(0.8))]).images
    base = enroller.pipe.generate(config, [ImageSpec("p", 1)]).images
    assert (with_id - base).abs().max() > 1e-4


def test_folded_artifact_equals_enrolling_adapter_path(enroller, photo):
    """The stored A/B reproduce the branch built from the adapter and the stored tokens."""
    from pidrt.models.branches import SCAIdentity
    from pidrt.models.conditions import FewTokenCondition

    ident = enroller.enroll([photo], EnrollOptions("sca", steps=STEPS)).identity_id
    tensors, _ = enroller.store.get(ident)
    sca = enroller.encoders.sca
    live = FewTokenCondition("sca", SCAIdentity(sca, tensors["tokens.cond"]), SCAIdentity(sca, tensors["tokens.uncond"]))
    config = SamplingConfig(steps=STEPS, guidance=5.0, height=64, width=64)
    images = [enroller.pipe.generate(config, [ImageSpec("p", 3, condition=c, schedule=ScaleSchedule(0.7))]).images
              for c in (enroller.condition(ident), live)]
    assert (images[0] - images[1]).abs().max() < 1e-5


def test_post_out_sca_artifact_equals_unfolded_reference(enroller, photo):
    """post_out SCA queries to_out(Z): its stored A carries W_o, its score bias b_o W'_q (methods.md 1)."""
    import dataclasses

    from pidrt.models.adapters import SCAAdapter
    from pidrt.models.branches import SCAIdentity
    from pidrt.models.conditions import FewTokenCondition

    adapter = SCAAdapter.random(enroller.pipe.layers, 32, seed=5, residual="post_out")
    post = Enroller(enroller.pipe, enroller.store, dataclasses.replace(enroller.encoders, sca=adapter))
    ident = post.enroll([photo], EnrollOptions("sca", steps=STEPS)).identity_id
    tensors, _ = post.store.get(ident)
    assert any(tensors[k].abs().max() > 0 for k in tensors if k.endswith(".score_bias"))
    live = FewTokenCondition("sca", SCAIdentity(adapter, tensors["tokens.cond"]),
                             SCAIdentity(adapter, tensors["tokens.uncond"]))
    images = []
    for cond, folded in ((post.condition(ident), True), (live, False)):
        config = SamplingConfig(steps=STEPS, guidance=5.0, height=64, width=64, folded=folded)
        images.append(post.pipe.generate(config, [ImageSpec("p", 3, condition=cond,
                                                            schedule=ScaleSchedule(0.7))]).images)
    assert (images[0] - images[1]).abs().max() < 1e-5


def test_tampered_metadata_is_corrupt_and_rebuilt(enroller, photo):
    """An edited `query` (what the folded branch reads) is refused, and enrolling again rebuilds it."""
    import json

    from pidrt.identity.store import CorruptEntryError

    result = enroller.enroll([photo], EnrollOptions("ip", steps=STEPS))
    enroller.forget(result.identity_id)
    path = enroller.store.path(result.identity_id)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"]["query"] == "x"
    header["__metadata__"]["query"] = "z"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CorruptEntryError, match="metadata changed"):
        enroller.condition(result.identity_id)
    again = enroller.enroll([photo], EnrollOptions("ip", steps=STEPS))
    assert again.created and again.identity_id == result.identity_id
    assert enroller.store.get(result.identity_id)[1]["query"] == "x"


def test_multi_reference_and_key_fields(enroller, photo):
    import io

    from PIL import Image

    flipped = io.BytesIO()
    Image.open(io.BytesIO(photo)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, format="PNG")
    one = enroller.enroll([photo], EnrollOptions("ip", steps=STEPS)).identity_id
    two = enroller.enroll([photo, flipped.getvalue()], EnrollOptions("ip", steps=STEPS)).identity_id
    weighted = enroller.enroll([photo, flipped.getvalue()], EnrollOptions("ip", reference_weights=(3.0, 1.0))).identity_id
    assert len({one, two, weighted}) == 3
    # IP-Adapter's tokens are the projection of the (weighted) average of the references' embeddings
    e1, e2 = (enroller.ip_embeddings([img], EnrollOptions("ip"))[0] for img in (photo, flipped.getvalue()))
    assert (e1 - e2).abs().max() > 1e-3  # the mirror image is another reference
    project = enroller.encoders.ip.image_proj
    for ident, mean in ((one, e1), (two, (e1 + e2) / 2), (weighted, (3 * e1 + e2) / 4)):
        with torch.no_grad():
            want = project(mean[None])[0]
        assert (enroller.store.get(ident)[0]["tokens.cond"] - want).abs().max() < 1e-5
    eaa2 = enroller.enroll([photo, flipped.getvalue()], EnrollOptions("eaa", steps=STEPS))
    cond = enroller.condition(eaa2.identity_id)
    singles = [enroller.condition(enroller.enroll([img], EnrollOptions("eaa", steps=STEPS)).identity_id)
               for img in (photo, flipped.getvalue())]
    # EAA keeps every reference: each step's K and V are the references' K and V, concatenated
    for t, step in enumerate(cond.steps):
        for name, kv in step.items():
            for i in (0, 1):
                want = torch.cat([single.steps[t][name][i] for single in singles])
                assert kv[i].shape == want.shape and (kv[i] - want).abs().max() < 1e-5, (t, name, i)
    assert cond.latents_t.shape[0] == 2
    other_steps = enroller.enroll([photo], EnrollOptions("eaa", steps=STEPS + 1)).identity_id
    assert other_steps != eaa2.identity_id


def test_corrupt_entry_is_rebuilt(enroller, photo):
    result = enroller.enroll([photo], EnrollOptions("ip", steps=STEPS))
    path = enroller.store.path(result.identity_id)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    again = enroller.enroll([photo], EnrollOptions("ip", steps=STEPS))
    assert again.created and again.identity_id == result.identity_id
    enroller.store.get(result.identity_id)  # valid again


def test_bad_enrollment_inputs(enroller, photo):
    with pytest.raises(PidrtError, match="at least one"):
        enroller.enroll([], EnrollOptions("sca"))
    with pytest.raises(PidrtError, match="unknown method"):
        EnrollOptions("lora")
    with pytest.raises(PidrtError):
        enroller.enroll([b"definitely not an image"], EnrollOptions("ip"))
    with pytest.raises(PidrtError, match="latents"):
        enroller.enroll([photo], EnrollOptions("eaa", steps=STEPS, resolution=128))
    for bad in (dict(resolution=0), dict(resolution=100), dict(steps=0)):
        with pytest.raises(PidrtError, match="resolution|steps"):
            EnrollOptions("eaa", **bad)


def test_errors_name_the_file_not_python_objects(enroller, photo):
    import io

    import numpy as np
    from PIL import Image

    blank = io.BytesIO()
    Image.fromarray(np.full((128, 128, 3), 200, np.uint8)).save(blank, format="PNG")
    with pytest.raises(PidrtError, match="no face found in holiday.png") as err:
        enroller.enroll([photo, blank.getvalue()], EnrollOptions("ip", names=("me.jpg", "holiday.png")))
    with pytest.raises(PidrtError, match="cannot decode image notes.txt") as err:
        enroller.enroll([b"plain text"], EnrollOptions("ip", names=("notes.txt",)))
    assert "object at 0x" not in str(err.value)
    with pytest.raises(PidrtError, match="no face found in reference 1"):  # unnamed: by position
        enroller.enroll([blank.getvalue()], EnrollOptions("ip"))


def test_enrollment_records_the_detector_that_ran(enroller, photo):
    first = enroller.enroll([photo], EnrollOptions("ip", steps=STEPS, detector="haar"))
    assert first.detector and first.detector.startswith("haar")
    assert enroller.store.get(first.identity_id)[1]["face_detector"] == first.detector
    assert enroller.enroll([photo], EnrollOptions("ip", steps=STEPS, detector="haar")).detector == first.detector
