"""Mode "retouch" served by the Generator on onnxruntime: one exported UNet with retouch inputs
serves the layout stage, the layout inversion and the retouch (swap and blend are inputs), and
gives the torch Generator's images; the chooser loads that graph for --retouch and admits only
what it can run.

The graph is the identity-less one tests/export and tests/engines/test_retouch_runners.py export
too (`tiny_export` shares it within the process): the request's identity strength is 0, so its
branch is off and the identity reaches the image through its cached reference path alone, which
is what this checks. The branches on graphs are checked by tests/engines/test_backends.py."""

from __future__ import annotations

import pytest

from pidrt.engines.choose import OpenedBackend
from pidrt.engines.graph_pipeline import trt_profiles
from pidrt.engines.options import Buckets
from pidrt.engines.pipeline_adapter import RunnerPipeline
from pidrt.engines.runners import open_runners
from pidrt.export.manifest import find_graph
from pidrt.export.testing import tiny_export
from pidrt.identity.enroll import Encoders, Enroller
from pidrt.identity.image_encoder import ClipImageEncoder
from pidrt.identity.store import IdentityStore
from pidrt.models.adapters import IPAdapterWeights
from pidrt.models.build import build_random
from pidrt.models.presets import TINY
from pidrt.runtime.generator import Generator
from pidrt.runtime.pipeline import Pipeline
from pidrt.runtime.requests import Defaults, GenerationRequest, GeneratorConfig, InvalidRequest
from pidrt.runtime.retouch_requests import RetouchRequest


STEPS = 4
CONFIG = GeneratorConfig(defaults=Defaults(steps=STEPS, guidance=5.0), enroll_detector="haar")


@pytest.fixture(scope="module")
def folder():
    return tiny_export("none", retouch_blocks=(10, 16))


@pytest.mark.slow  # the first module of a run to ask for the graph exports it (~30 s on 2 busy cores)
def test_retouch_on_ort_through_the_generator_equals_torch(folder, tmp_path, photos):
    torch_pipe = Pipeline(build_random(TINY, seed=0))
    ort_pipe = RunnerPipeline(build_random(TINY, seed=0), open_runners(folder, "ort", "none", threads=1, retouch=True))
    L = torch_pipe.layers
    enc = Encoders(ip=IPAdapterWeights.random(L, 32, embeddings_dim=64), image_encoder=ClipImageEncoder.random(64))
    store = IdentityStore(tmp_path / "store")
    with Generator(torch_pipe, Enroller(torch_pipe, store, enc), CONFIG) as gen:
        ident = gen.enroll([photos[0]], "ip", retouch=True).identity_id
        request = GenerationRequest("a photo of a man", identity=ident, seed=3, scale=0.0, mode="retouch",
                                    retouch=RetouchRequest("man", 1, 1, 2, 2, return_layout=True))
        want = gen.generate(request, 120)
    # The engine server reads the same store (the reference was recorded on the torch UNet).
    with Generator(ort_pipe, Enroller(ort_pipe, store, enc), CONFIG, backend="ort") as gen:
        got = gen.generate(request, 120)
    for a, b in zip(got.images, want.images):
        assert (a.pixels - b.pixels).abs().max() < 2e-3
        assert a.unet_calls == b.unet_calls == {"stage1": STEPS, "layout_inversion": STEPS, "stage2": STEPS,
                                                "total": 3 * STEPS}
        assert a.layout is not None


def test_the_chooser_finds_the_retouch_graph_and_admits_only_what_it_runs(folder, tiny_pipe):
    entry = find_graph(folder, "unet", "none", "float32", retouch=True)
    assert entry.spec.retouch_layers
    with pytest.raises(Exception, match="without retouch inputs"):
        find_graph(folder, "unet", "none", "float32", retouch=False)
    gen = Generator(tiny_pipe, None, CONFIG)
    try:
        r = gen.resolve(GenerationRequest("a man", identity="ip-0123456789abcdef", mode="retouch",
                                          retouch={"subject": "man", "layout_steps": 1}))
        recorded = gen.resolve(GenerationRequest("a man", identity="ip-0123456789abcdef", mode="retouch",
                                                 retouch={"subject": "man", "layout_path": "recorded"}))
    finally:
        gen.close()
    plain = OpenedBackend("ort", "ort", None, None, ("none", "ip"), {"lean": True})
    with pytest.raises(InvalidRequest, match="--retouch"):
        plain.admit(r)
    served = OpenedBackend("ort", "ort", None, None, ("none", "ip"), {"lean": True}, retouch_blocks=(10, 16))
    served.admit(r)
    with pytest.raises(InvalidRequest, match="recorded"):
        served.admit(recorded)
    with pytest.raises(InvalidRequest, match="edit 12..15"):
        OpenedBackend("trt", "trt", None, None, ("ip",), {}, retouch_blocks=(12, 16)).admit(r)
    # TensorRT's profiles hold stage 2's batch: the layout path's rows besides both CFG halves.
    buckets = Buckets.parse(["1,2@64x64"])
    assert trt_profiles(buckets, 8)[0].batch == (1, 4, 4) and trt_profiles(buckets, 8, 3)[0].batch == (1, 6, 6)
