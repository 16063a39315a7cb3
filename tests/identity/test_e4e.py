"""The e4e encoder: published state-dict names, checkpoint round trips and errors, W+ codes on a
real aligned face, style mixing and multi-reference aggregation.

Random weights only (nothing can be downloaded); most tests use the narrow ``base=16`` layout,
which keeps every parameter name of the published ``base=64`` encoder.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import skimage.data as skdata
import torch
import torch.nn.functional as F

from pidrt.errors import FormatError, PidrtError
from pidrt.identity.e4e import E4EEncoder, aggregate, image_to_tensor, mix_styles


@pytest.fixture(scope="module")
def small() -> E4EEncoder:
    return E4EEncoder.random(seed=3, base=16)


@pytest.fixture(scope="module")
def full() -> E4EEncoder:
    return E4EEncoder.random(seed=0)  # the published layout, random weights (~1 GB of fp32)


@pytest.fixture(scope="module")
def aligned_face() -> torch.Tensor:
    """The astronaut photo, FFHQ-aligned on Haar landmarks (the `test` extra's OpenCV)."""
    from pidrt.identity.align import align_ffhq
    from pidrt.identity.faces import detect_faces, select_face

    img = skdata.astronaut()
    face = select_face(detect_faces(img, "haar"), name="astronaut")
    return image_to_tensor(align_ffhq(img, face.landmarks5, 256))


def _published_layout(enc: E4EEncoder, latent_avg=None) -> dict:
    """What e4e's training script saves: the whole pSp state dict and latent_avg, plus opts."""
    ckpt = enc.checkpoint_dict()
    ckpt["state_dict"]["decoder.style.1.weight"] = torch.zeros(4, 4)  # decoder keys are ignored
    ckpt["opts"] = {"encoder_type": "Encoder4Editing", "stylegan_size": 1024, "start_from_latent_avg": True}
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg
    return ckpt


def test_published_parameter_names_and_shapes(full):
    enc = full
    sd = {f"encoder.{k}": tuple(v.shape) for k, v in enc.state_dict().items()}
    expected = {
        "encoder.input_layer.0.weight": (64, 3, 3, 3),
        "encoder.input_layer.1.running_var": (64,),
        "encoder.input_layer.2.weight": (64,),
        "encoder.body.0.res_layer.0.weight": (64,),
        "encoder.body.0.res_layer.1.weight": (64, 64, 3, 3),
        "encoder.body.0.res_layer.2.weight": (64,),
        "encoder.body.0.res_layer.3.weight": (64, 64, 3, 3),
        "encoder.body.0.res_layer.4.bias": (64,),
        "encoder.body.0.res_layer.5.fc1.weight": (4, 64, 1, 1),
        "encoder.body.0.res_layer.5.fc2.weight": (64, 4, 1, 1),
        "encoder.body.3.shortcut_layer.0.weight": (128, 64, 1, 1),
        "encoder.body.3.shortcut_layer.1.running_mean": (128,),
        "encoder.body.7.shortcut_layer.0.weight": (256, 128, 1, 1),
        "encoder.body.21.shortcut_layer.0.weight": (512, 256, 1, 1),
        "encoder.body.23.res_layer.5.fc2.weight": (512, 32, 1, 1),
        "encoder.styles.0.convs.0.weight": (512, 512, 3, 3),
        "encoder.styles.0.convs.6.bias": (512,),  # 16x16 -> 1x1: 4 convs
        "encoder.styles.3.convs.8.weight": (512, 512, 3, 3),  # 32x32: 5 convs
        "encoder.styles.17.convs.10.weight": (512, 512, 3, 3),  # 64x64: 6 convs
        "encoder.styles.17.linear.weight": (512, 512),
        "encoder.styles.17.linear.bias": (512,),
        "encoder.latlayer1.weight": (512, 256, 1, 1),
        "encoder.latlayer1.bias": (512,),
        "encoder.latlayer2.weight": (512, 128, 1, 1),
    }
    for k, shape in expected.items():
        assert sd.get(k) == shape, k
    # identity shortcuts (max-pool) have no parameters; only 3 units change width
    assert "encoder.body.0.shortcut_layer.0.weight" not in sd
    assert sum(k.endswith("shortcut_layer.0.weight") for k in sd) == 3
    assert "encoder.styles.0.convs.8.weight" not in sd and "encoder.styles.3.convs.10.weight" not in sd
    assert not any("latent_avg" in k for k in sd)  # stored beside the state dict, as published
    assert len([k for k in sd if k.endswith(".linear.weight")]) == 18
    assert sum(v.numel() for v in enc.parameters()) > 260_000_000


def test_full_size_encode_is_e4e_composition(full):
    """At the published size, W+ is e4e's composition of the encoder's parts (Tov et al. 2021,
    as e4e's Encoder4Editing.forward runs it): the feature maps after IR-50's stages 2, 3, 4
    (64x64x128, 32x32x256, 16x16x512) feed the 16x16 map to styles 0-2, the FPN's 32x32 map to
    3-6 and its 64x64 map to 7-17; row 0 is w0, row i is w0 + style i, plus latent_avg. Hooks
    record what each part saw and gave in one encode call, so nothing big runs twice."""
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    stage_ends = {6: "c1", 20: "c2", 23: "c3"}  # units per stage: 3, 4, 14, 3
    seen, gave = {}, {}

    def record(key):
        def hook(module, args, out):
            seen[key], gave[key] = args[0], out
        return hook

    hooks = [full.body[i].register_forward_hook(record(k)) for i, k in stage_ends.items()]
    hooks += [s.register_forward_hook(record(i)) for i, s in enumerate(full.styles)]
    try:
        w = full.encode(x)
    finally:
        for h in hooks:
            h.remove()
    c1, c2, c3 = gave["c1"], gave["c2"], gave["c3"]
    assert [tuple(c.shape[1:]) for c in (c1, c2, c3)] == [(128, 64, 64), (256, 32, 32), (512, 16, 16)]
    up_add = lambda a, b: F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=True) + b  # noqa: E731
    with torch.inference_mode():
        p2 = up_add(c3, full.latlayer1(c2))
        p1 = up_add(p2, full.latlayer2(c1))
    for i in range(18):
        torch.testing.assert_close(seen[i], c3 if i < 3 else p2 if i < 7 else p1)
    rows = [gave[0]] + [gave[0] + gave[i] for i in range(1, 18)]
    assert w.shape == (1, 18, 512)
    torch.testing.assert_close(w, torch.stack(rows, 1) + full.latent_avg)


def test_encode_real_aligned_face(small, aligned_face):
    assert aligned_face.shape == (1, 3, 256, 256) and -1 <= aligned_face.min() < aligned_face.max() <= 1
    batch = small.encode(torch.cat([aligned_face, aligned_face.flip(-1)]))
    assert batch.shape == (2, 18, 128) and torch.isfinite(batch).all()
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)  # the mirrored face codes differently
    with torch.inference_mode():
        raw = small(aligned_face)
        w0 = small.styles[0](small.body(small.input_layer(aligned_face)))
    # e4e: row 0 is w0, rows 1..17 are w0 + their delta; encode adds latent_avg
    assert torch.allclose(batch[0], raw[0] + small.latent_avg, atol=1e-4)
    assert torch.allclose(raw[0, 0], w0[0], atol=1e-4)


def _same_weights(a: E4EEncoder, b: E4EEncoder) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa) and torch.equal(a.latent_avg, b.latent_avg)


def test_random_is_seeded(small):
    assert _same_weights(E4EEncoder.random(seed=3, base=16), small)
    assert not _same_weights(E4EEncoder.random(seed=4, base=16), small)


@pytest.mark.parametrize("latent_shape", ["stored", (128,), (1, 128)])
def test_checkpoint_round_trip(small, tmp_path, latent_shape):
    la = None if latent_shape == "stored" else small.latent_avg[0].reshape(latent_shape).clone()
    path = tmp_path / "e4e_small.pt"
    torch.save(_published_layout(small, la), path)
    loaded = E4EEncoder.from_checkpoint(path)
    sa, sb = small.state_dict(), loaded.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    want = small.latent_avg if la is None else small.latent_avg[0].expand(18, 128)
    assert torch.equal(loaded.latent_avg, want)
    if la is None:  # the loaded encoder computes the same codes
        x = torch.rand(1, 3, 256, 256) * 2 - 1
        assert torch.allclose(loaded.encode(x), small.encode(x), atol=1e-5)


def test_bare_state_dict_and_safetensors(small, tmp_path):
    from safetensors.torch import save_file

    bare = dict(small.state_dict())
    bare["latent_avg"] = small.latent_avg.clone()
    torch.save(bare, tmp_path / "bare.pt")
    assert _same_weights(E4EEncoder.from_checkpoint(tmp_path / "bare.pt"), small)
    flat = {k: v.contiguous() for k, v in small.checkpoint_dict()["state_dict"].items()}
    flat["latent_avg"] = small.latent_avg.clone()
    save_file(flat, str(tmp_path / "e4e.safetensors"))
    assert _same_weights(E4EEncoder.from_checkpoint(tmp_path / "e4e.safetensors"), small)


def test_missing_extra_and_misshapen_keys_are_format_errors(small, tmp_path):
    ckpt = _published_layout(small)
    sd = ckpt["state_dict"]
    del sd["encoder.styles.4.linear.bias"]
    sd["encoder.styles.4.linear.gain"] = torch.ones(128)
    sd["encoder.latlayer2.weight"] = torch.zeros(128, 64, 3, 3)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(FormatError) as err:
        E4EEncoder.from_checkpoint(tmp_path / "bad.pt")
    msg = str(err.value)
    assert "missing keys: styles.4.linear.bias" in msg
    assert "unexpected keys: styles.4.linear.gain" in msg
    assert "latlayer2.weight (128, 64, 3, 3) != (128, 32, 1, 1)" in msg

    ok = _published_layout(small)
    del ok["latent_avg"]
    torch.save(ok, tmp_path / "nolatent.pt")
    with pytest.raises(FormatError, match="no 'latent_avg'"):
        E4EEncoder.from_checkpoint(tmp_path / "nolatent.pt")
    torch.save({"state_dict": {"decoder.x": torch.zeros(1)}}, tmp_path / "decoder_only.pt")
    with pytest.raises(FormatError, match="not an e4e encoder"):
        E4EEncoder.from_checkpoint(tmp_path / "decoder_only.pt")


def test_pickled_objects_need_trust(small, tmp_path):
    ckpt = _published_layout(small)
    ckpt["opts"] = argparse.Namespace(encoder_type="Encoder4Editing")  # not weights_only-safe
    torch.save(ckpt, tmp_path / "pickled.pt")
    with pytest.raises(FormatError, match="trust_pickle=True"):
        E4EEncoder.from_checkpoint(tmp_path / "pickled.pt")
    assert E4EEncoder.from_checkpoint(tmp_path / "pickled.pt", trust_pickle=True).n_styles == 18
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="not a torch checkpoint"):
        E4EEncoder.from_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(PidrtError, match="not found"):
        E4EEncoder.from_checkpoint(tmp_path / "absent.pt")


def test_encode_rejects_bad_inputs(small):
    with pytest.raises(PidrtError, match=r"\[B, 3, 256, 256\]"):
        small.encode(torch.zeros(1, 3, 128, 128))
    with pytest.raises(PidrtError, match="float"):
        small.encode(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))
    with pytest.raises(PidrtError, match=r"\[-1, 1\]"):
        small.encode(torch.full((1, 3, 256, 256), 200.0))
    with pytest.raises(PidrtError):
        image_to_tensor(np.zeros((256, 256), np.uint8))


def test_mix_styles():
    a, b, c = (torch.full((18, 512), float(i)) for i in (1, 2, 3))
    mixed = mix_styles([a, b], [range(0, 9), range(9, 18)])  # PIDiff: rows 1-9 from A, 10-18 from B
    assert mixed.shape == (18, 512)
    assert (mixed[:9] == 1).all() and (mixed[9:] == 2).all()
    three = mix_styles([a, b.unsqueeze(0), c], [range(0, 4), range(4, 8), range(8, 18)])
    assert three[:, 0].tolist() == [1] * 4 + [2] * 4 + [3] * 10
    with pytest.raises(PidrtError, match="row 5 is given by codes 0 and 1"):
        mix_styles([a, b], [range(0, 9), range(5, 18)])
    with pytest.raises(PidrtError, match=r"rows \[17\] are given by no code"):
        mix_styles([a, b], [range(0, 9), range(9, 17)])
    with pytest.raises(PidrtError, match="outside"):
        mix_styles([a, b], [range(0, 9), range(9, 19)])
    with pytest.raises(PidrtError, match="one row range per code"):
        mix_styles([a, b], [range(18)])


def test_aggregate():
    codes = torch.stack([torch.full((18, 512), v) for v in (1.0, 2.0, 6.0)])
    assert torch.allclose(aggregate(codes), torch.full((18, 512), 3.0))
    assert torch.allclose(aggregate(codes, [2.0, 2.0, 0.0]), torch.full((18, 512), 1.5))  # normalised
    assert torch.allclose(aggregate(codes, torch.tensor([0.0, 0.0, 5.0])), codes[2])
    assert torch.allclose(aggregate(codes[:1]), codes[0])
    for bad in ([1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(PidrtError, match="non-negative"):
            aggregate(codes, bad)
    with pytest.raises(PidrtError, match="2 weights for 3 codes"):
        aggregate(codes, [1.0, 1.0])
    with pytest.raises(PidrtError, match="N >= 1"):
        aggregate(torch.zeros(18, 512))
