"""engines.choose: every backend built from the same options gives the reference's images.

ort runs the tiny graphs of `pidrt.export.testing.tiny_export` (shared with tests/export and
tests/engines/test_pipeline_adapter.py); fast runs on CPU with its injectable capturer
(`EagerCapturer`) and without CUDA graphs or Triton. Tolerances: float32 on both sides, so
the latents agree to 1e-4 (ort: the graphs' explicit attention; fast: channels_last
convolutions), the images to 1e-4 in [0, 1].
"""

from __future__ import annotations

import logging

import pytest
import torch

from pidrt.engines import choose
from pidrt.engines.base import BackendUnavailable
from pidrt.engines.cuda_graphs import EagerCapturer
from pidrt.engines.fast_torch import FastTorchConfig
from pidrt.engines.options import BackendOptions, Buckets
from pidrt.errors import MissingDependencyError, PidrtError
from pidrt.export.specs import unet_spec
from pidrt.models.adapters import IPAdapterWeights, SCAAdapter
from pidrt.models.branches import IPIdentity, SCAIdentity
from pidrt.models.presets import TINY
from pidrt.models.conditions import EAACondition, FewTokenCondition, ScaleSchedule
from pidrt.runtime.pipeline import ImageSpec, SamplingConfig
from pidrt.runtime.requests import GeneratorConfig, InvalidRequest, resolve_request, GenerationRequest
from pidrt.runtime.setup import RuntimeOptions, build_runtime

CFG = SamplingConfig(steps=2, guidance=5.0, height=64, width=64)
TOL = 1e-4
FAST_CPU = FastTorchConfig(dtype=torch.float32, kernels=False, cuda_graphs=False)
BUCKETS = Buckets.parse("1,3@64x64")


def reference():
    return build_runtime(RuntimeOptions())


def few_token(kind: str, layers, seed: int) -> FewTokenCondition:
    g = torch.Generator().manual_seed(seed)
    if kind == "sca":
        adapter = SCAAdapter.random(layers, TINY.unet.cross_attention_dim, seed=seed)
        with torch.no_grad():
            return FewTokenCondition("sca", SCAIdentity(adapter, adapter.mapping(torch.randn(1, 18, 512, generator=g))[0]),
                                     SCAIdentity(adapter, adapter.mapping.unconditional()[0]))
    adapter = IPAdapterWeights.random(layers, TINY.unet.cross_attention_dim, seed=seed, embeddings_dim=16)
    embed = torch.randn(1, 16, generator=g)
    with torch.no_grad():
        return FewTokenCondition("ip", IPIdentity(adapter, adapter.image_proj(embed)[0]),
                                 IPIdentity(adapter, adapter.image_proj(torch.zeros_like(embed))[0]))


def eaa(layers, seed: int) -> EAACondition:
    spec = unet_spec(TINY, layers, "eaa")
    g = torch.Generator().manual_seed(seed)
    from pidrt.engines.warmup import synthetic_condition

    zeros = synthetic_condition(spec, 64, 64, CFG.steps, TINY.latent_scale)
    return EAACondition(steps=[{n: (torch.randn(k.shape, generator=g) * 0.3, torch.randn(v.shape, generator=g) * 0.3)
                                for n, (k, v) in step.items()} for step in zeros.steps])


def mixed_batch(method: str, layers) -> list[ImageSpec]:
    """Two identities of `method` at different scales (one from step 1 on) and an identity-less image."""
    make = (lambda s: eaa(layers, s)) if method == "eaa" else (lambda s: few_token(method, layers, s))
    return [ImageSpec("a portrait", 1, condition=make(1), schedule=ScaleSchedule(0.8)),
            ImageSpec("a dog", 2),
            ImageSpec("a face", 3, condition=make(2), schedule=ScaleSchedule(1.0, start=1))]


def assert_same(ref, got) -> None:
    assert (ref.latents - got.latents).abs().max() < TOL
    assert (ref.images - got.images).abs().max() < TOL


# ------------------------------------------------------------------ start-up checks (cheap)
def test_auto_is_torch_on_cpu():
    assert choose.resolve("auto", "cpu") == "torch" and choose.resolve("auto", "cuda:0") == "fast"
    assert choose.preflight(BackendOptions(), "cpu") == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what auto does where fast cannot start")
def test_auto_falls_back_to_torch_when_fast_cannot_start(caplog):
    with caplog.at_level(logging.WARNING):
        name, reason = choose._preflight(BackendOptions(), "cuda", torch.float16)
    assert name == "torch" and "torch sees no CUDA device" in reason
    assert any("falling back to torch" in r.getMessage() for r in caplog.records)
    with pytest.raises(PidrtError, match="torch sees no CUDA device"):  # asked for by name: an error
        choose.preflight(BackendOptions(backend="fast"), "cuda", torch.float16)


def test_a_backend_that_cannot_run_fails_at_start_with_reason_and_fix(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"fast backend runs on a CUDA GPU.*Use --backend torch"):
        choose.preflight(BackendOptions(backend="fast"), "cpu")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"backend 'trt' cannot run here: .*pip install 'pidrt\[trt\]'"):
            choose.preflight(BackendOptions(backend="trt"), "cpu")
    with pytest.raises(PidrtError, match="no export manifest; run `pidrt export`"):
        choose.preflight(BackendOptions(backend="ort", engines=tmp_path), "cpu")
    with pytest.raises(BackendUnavailable, match="float32 or float16, not torch.bfloat16"):
        choose.preflight(BackendOptions(backend="ort"), "cpu", torch.bfloat16)


def test_admission_names_the_buckets_and_the_loaded_methods():
    pipe, _ = reference()
    opened = choose.OpenedBackend("ort", "ort", pipe, BUCKETS, ("none", "ip"))
    config = GeneratorConfig()
    opened.admit(resolve_request(GenerationRequest("p", n=3), config, TINY))
    with pytest.raises(InvalidRequest, match="buckets are 1,3@64x64"):
        opened.admit(resolve_request(GenerationRequest("p", width=128), config, TINY))
    with pytest.raises(InvalidRequest, match=r"sca identities are not served here.*--methods including sca"):
        opened.admit(resolve_request(GenerationRequest("p", identity="sca-0123456789abcdef"), config, TINY))


# ------------------------------------------------------------------ fast (CPU, injected capturer)
def test_fast_warms_every_bucket_and_matches_the_reference():
    ref_pipe, _ = reference()
    pipe, encoders = reference()
    opened = choose.open_backend(BackendOptions(backend="fast", fast=FAST_CPU, buckets=BUCKETS, methods=("sca",)),
                                 pipe, encoders, max_batch=3, capturer=EagerCapturer(), progress=False)
    fast = opened.pipeline
    assert opened.name == "fast" and type(fast).__name__ == "FastPipeline"
    # One capture per bucket and method structure (none, sca), all at start-up.
    assert fast.graphed.stats.captures == 4 and len(opened.info["warmup_s"]) == 4
    specs = mixed_batch("sca", ref_pipe.layers)
    assert_same(ref_pipe.generate(CFG, specs), fast.generate(CFG, specs))
    assert fast.graphed.stats.captures == 4  # the mixed batch of 3 replayed a warmed graph
    assert "fast" in opened.report() and opened.report()["fast"]["graphs"]["replays"] > 0


def test_auto_keeps_fast_when_it_agrees_and_falls_back_when_not(monkeypatch, caplog):
    pipe, _ = reference()
    kept, name, reason = choose._auto(pipe, FAST_CPU, BUCKETS, EagerCapturer())
    assert (name, reason) == ("fast", None) and kept is not pipe

    from pidrt.engines import fast_torch

    make_fast = fast_torch.make_fast

    def wrong(*args, **kw):
        made = make_fast(*args, **kw)
        made.unet = lambda x, t, ctx: torch.zeros_like(x)
        return made

    monkeypatch.setattr(fast_torch, "make_fast", wrong)
    with caplog.at_level(logging.WARNING):
        kept, name, reason = choose._auto(pipe, FAST_CPU, BUCKETS, EagerCapturer())
    assert kept is pipe and name == "torch" and "differs from the reference" in reason
    assert any("falling back to torch" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ ort (exported tiny graphs)
@pytest.fixture(scope="module")
def ort_backend(engines):
    pipe, encoders = reference()
    full = sum(p.numel() for p in pipe.models.unet.parameters())
    opened = choose.open_backend(BackendOptions(backend="ort", engines=engines, threads=1, buckets=BUCKETS), pipe,
                                 encoders, max_batch=3, progress=False)
    return opened, encoders, full


@pytest.mark.parametrize("method", ["none", "sca", "ip", "eaa"])
def test_ort_matches_torch_with_mixed_identities_and_scales(ort_backend, method):
    opened, _, _ = ort_backend
    ref_pipe, _ = reference()
    specs = [ImageSpec("a portrait", 1), ImageSpec("a dog", 2)] if method == "none" else mixed_batch(method,
                                                                                                     ref_pipe.layers)
    assert_same(ref_pipe.generate(CFG, specs), opened.pipeline.generate(CFG, specs))


def test_ort_server_is_lean(ort_backend):
    opened, _, full = ort_backend
    report = opened.report()
    assert report["lean"] and set(report["graphs"]) == {"text_encoder", "vae_decoder", "unet:none", "unet:sca",
                                                        "unet:ip", "unet:eaa"}
    assert all(g["cache"] == "given" for g in report["graphs"].values())
    assert len(report["warmup_s"]) == 2 * 4  # buckets x methods
    models = opened.pipeline.models
    assert models.text_encoder is None and models.vae.decoder is None  # the VAE encoder stays for edits
    kept = sum(p.numel() for p in models.unet.parameters())
    assert 0 < kept < full / 10  # only the cross layers' to_q / to_out remain
    assert opened.base_fingerprint and len(opened.base_fingerprint) == 64
    assert "EAA enrollment records features inside the torch UNet" in opened.pipeline.record_unavailable


def test_lean_enrollment_keeps_identity_ids_and_refuses_eaa(ort_backend, photos, tmp_path):
    from pidrt.identity.enroll import Enroller, EnrollOptions
    from pidrt.identity.store import IdentityStore

    opened, encoders, _ = ort_backend
    ref_pipe, ref_encoders = reference()
    store = IdentityStore(tmp_path)
    opts = EnrollOptions("ip", detector="haar")
    on_torch = Enroller(ref_pipe, store, ref_encoders).enroll([photos[0]], opts)
    on_ort = Enroller(opened.pipeline, store, encoders, base_fp=opened.base_fingerprint).enroll([photos[0]], opts)
    assert on_torch.created and not on_ort.created and on_ort.identity_id == on_torch.identity_id
    with pytest.raises(PidrtError, match="--keep-torch-unet"):
        Enroller(opened.pipeline, store, encoders, base_fp=opened.base_fingerprint).enroll(
            [photos[0]], EnrollOptions("eaa", steps=2, detector="haar"))


@pytest.mark.slow
def test_engine_cache_second_start_and_corrupt_entry(tmp_path, caplog):
    options = BackendOptions(backend="ort", cache_dir=tmp_path, methods=("none",), threads=1, warmup=False,
                             buckets=Buckets.parse("1@64x64"))

    def start():
        pipe, encoders = reference()
        opened = choose.open_backend(options, pipe, encoders, max_batch=1, progress=False)
        return opened, {k: g["cache"] for k, g in opened.report()["graphs"].items()}

    first, statuses = start()
    assert set(statuses.values()) == {"built"}
    out = first.pipeline.generate(CFG, [ImageSpec("a dog", 2)])
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 3 and all(p.startswith("ort-") for p in entries)
    second, statuses = start()
    assert set(statuses.values()) == {"hit"} and sorted(p.name for p in tmp_path.iterdir()) == entries
    assert_same(out, second.pipeline.generate(CFG, [ImageSpec("a dog", 2)]))
    text = next(tmp_path.glob("ort-text_encoder*"))
    graph = next(text.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-16])  # a truncated graph must never reach onnxruntime
    with caplog.at_level(logging.WARNING):
        third, statuses = start()
    assert statuses["text_encoder"] == "rebuilt" and statuses["unet:none"] == "hit"
    assert any("corrupt engine cache entry" in r.getMessage() for r in caplog.records)
    assert_same(out, third.pipeline.generate(CFG, [ImageSpec("a dog", 2)]))


# ------------------------------------------------------------------ GPU (skipped without CUDA)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_a_gpu_serves_fast_with_every_bucket_captured():
    ref_pipe, _ = build_runtime(RuntimeOptions(device="cuda", dtype="float16"))
    pipe, encoders = build_runtime(RuntimeOptions(device="cuda", dtype="float16"))
    opened = choose.open_backend(BackendOptions(buckets=BUCKETS, methods=("sca",)), pipe, encoders, max_batch=3,
                                 progress=False)
    assert opened.name == "fast" and opened.info["fallback"] is None, opened.info
    stats = opened.pipeline.graphed.stats
    captured = stats.captures  # auto's check step, then bucket x method (none, sca)
    assert captured >= 4 and not stats.eager, stats
    specs = mixed_batch("sca", ref_pipe.layers)
    want, got = ref_pipe.generate(CFG, specs).images, opened.pipeline.generate(CFG, specs).images
    assert torch.isfinite(got).all() and (want - got).abs().max() < 3e-2
    assert stats.captures == captured  # the mixed batch of 3 replayed a graph captured at start
