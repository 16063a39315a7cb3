"""Backend registry, availability, the runner interface on torch / ort, and the TensorRT gate."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pidrt.engines.base import Backend, BackendUnavailable, availability, doctor_report, register, require_backend
from pidrt.engines.runners import open_graph, open_runners
from pidrt.errors import MissingDependencyError, PidrtError
from pidrt.export.inputs import example_feed, random_identity_batch
from pidrt.export.manifest import find_graph
from pidrt.export.testing import tiny_export
from pidrt.models.build import build_random
from pidrt.models.presets import TINY

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT or not torch.cuda.is_available(),
                               reason="TensorRT and a CUDA GPU are needed (tensorrt cannot be installed on CPU CI)")


@pytest.fixture(scope="module")
def models():
    return build_random(TINY, seed=0)


@pytest.fixture(scope="module")
def folder():
    tiny_export("sca")
    return tiny_export("none", kinds=("unet", "text_encoder", "vae_decoder", "vae_encoder"))


def test_doctor_report_lists_every_backend():
    report = {r["backend"]: r for r in doctor_report()}
    assert set(report) == {"torch", "ort", "trt"}
    assert report["torch"]["available"] and report["ort"]["available"]
    assert "CPUExecutionProvider" in report["ort"]["details"]["providers"]
    for r in report.values():
        assert set(r) >= {"backend", "available", "reason", "version", "devices"}
        assert r["available"] or r["reason"]


def test_unavailable_backend_says_why():
    with pytest.raises(PidrtError, match="unknown backend"):
        Backend.parse("onnx")
    if not HAVE_TRT:
        info = availability("trt")
        assert not info.available and "pip install 'pidrt[trt]'" in info.reason
        with pytest.raises(MissingDependencyError, match="'trt' cannot run here"):
            require_backend("trt")
    elif not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
            require_backend("trt")


def test_registry_can_point_a_backend_elsewhere(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("fake_backend")
    fake.probe = lambda: (_ for _ in ()).throw(RuntimeError("driver crashed"))
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    from pidrt.engines import base

    monkeypatch.setitem(base._MODULES, Backend.TRT, base._MODULES[Backend.TRT])
    register("trt", "fake_backend")
    info = availability("trt")
    assert not info.available and "driver crashed" in info.reason  # doctor never crashes


def test_torch_and_ort_runners_agree(models, folder):
    entry = find_graph(folder, "unet", "sca")
    feed = example_feed(entry.spec, 3, 16, 8)
    payloads, scale = random_identity_batch(models.unet, entry.spec, 16, 8)
    torch_unet = open_runners(folder, "torch", "sca", models=models).unet
    ort_unet = open_runners(folder, "ort", "sca", threads=1).unet
    args = (feed["sample"], feed["timestep"], feed["encoder_hidden_states"], scale)
    ref, got = torch_unet(*args, payloads=payloads), ort_unet(*args, payloads=payloads)
    assert ref.shape == (3, 4, 16, 8) and (ref - got).abs().max() < 1e-4
    # named identity inputs override payload-derived ones: zeros = no branch at all
    zeros = {n: torch.zeros_like(v) for n, v in feed.items() if n[:2] in ("a_", "b_") or n.startswith("bias_")}
    base = open_runners(folder, "ort", "none", threads=1).unet(*args[:3])
    assert (ort_unet(*args, payloads=payloads, identity=zeros) - base).abs().max() < 1e-5


def test_feed_checks(folder):
    runner = open_graph(find_graph(folder, "vae_decoder"), "ort", threads=1)
    with pytest.raises(PidrtError, match="dtype"):
        runner.run({"latent": torch.zeros(1, 4, 8, 8, dtype=torch.float16)})
    with pytest.raises(PidrtError, match="missing"):
        runner.run({"x": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(PidrtError, match="expected shape"):
        runner.run({"latent": torch.zeros(1, 3, 8, 8)})


def test_runners_of_every_kind(models, folder):
    runners = open_runners(folder, "ort", "none", threads=1)
    ids = models.tokenizer(["a", "b"])
    hidden = runners.text_encoder(ids)
    assert hidden.shape == (2, 77, 32)
    images = runners.vae_decoder(torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert runners.vae_encoder(images).shape == (2, 4, 8, 8)
    assert runners.unet.method == "none"


@pytest.mark.gpu
@needs_trt
def test_trt_engine_matches_ort(folder, tmp_path):
    from pidrt.engines.trt_backend import BuildOptions, build_engine

    entry = find_graph(folder, "unet", "sca")
    path = build_engine(entry, BuildOptions(fp16=False))
    assert build_engine(entry, BuildOptions(fp16=False)) == path  # cached
    trt_unet = open_runners(folder, "trt", "sca", options=BuildOptions(fp16=False)).unet
    ort_unet = open_runners(folder, "ort", "sca").unet
    feed = {k: v.cuda() for k, v in example_feed(entry.spec, 2, 8, 8).items()}
    args = (feed["sample"], feed["timestep"], feed["encoder_hidden_states"], feed["scale"])
    ident = {k: v for k, v in feed.items() if k not in ("sample", "timestep", "encoder_hidden_states", "scale")}
    assert (trt_unet(*args, identity=ident).cpu() - ort_unet(*(a.cpu() for a in args),
            identity={k: v.cpu() for k, v in ident.items()})).abs().max() < 1e-3
