"""The trt backend's glue against stand-ins of TensorRT 10 and 11, polygraphy and torch's CUDA graphs.

TensorRT cannot be installed on CPU CI (the real engine tests are in test_backends.py and
test_trt_plugins.py, skipped without it). What is checked here is what pidrt decides around it:
the precision flags per TensorRT version (11.x has no ``BuilderFlag.FP16``: its bindings'
``BuilderFlag`` enum lists no FP16, and polygraphy refuses ``fp16=True`` there), polygraphy's
failures turned into pidrt errors, every boolean TensorRT returns checked, and CUDA-graph capture
done as trtexec does it, with a failed capture never replayed.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from polygraphy.exception import PolygraphyException

from pidrt.engines import trt_backend
from pidrt.engines.base import Availability, Backend
from pidrt.engines.trt_backend import BuildOptions, TrtRunner, build_engine, capture_graph, precision_flags
from pidrt.errors import PidrtError
from pidrt.export.manifest import GraphEntry
from pidrt.export.specs import vae_decoder_spec
from pidrt.models.presets import TINY

# BuilderFlag members as the bindings list them (python/src/infer/pyCore.cpp of each release).
FLAGS_10 = ("FP16", "BF16", "INT8", "REFIT", "TF32", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")
FLAGS_11 = ("BF16", "REFIT", "TF32", "DEBUG", "GPU_FALLBACK", "DIRECT_IO", "STRIP_PLAN")


class Context:
    """An IExecutionContext whose calls are recorded and whose boolean results can be set to fail."""

    def __init__(self, fail=()):
        self.fail, self.calls, self.addresses, self.shapes = set(fail), [], {}, {}

    def _ok(self, *what) -> bool:
        self.calls.append(what)
        return what[:2] not in self.fail and what[:1] not in self.fail

    def set_optimization_profile_async(self, index, stream):
        return self._ok("profile", index)

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return self._ok("shape", name)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return self._ok("address", name)

    def get_tensor_shape(self, name):
        b, _, h, w = self.shapes["latent"]
        return (b, 3, 8 * h, 8 * w)

    def execute_async_v3(self, stream):
        return self._ok("execute", stream, dict(self.addresses))


def tensorrt_standin(version: str, context: Context | None = None) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.BuilderFlag = type("BuilderFlag", (), {f: f for f in (FLAGS_10 if version.startswith("10.") else FLAGS_11)})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Engine:
        def create_execution_context(self):
            return context

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine()

    trt.Runtime = Runtime
    return trt


def polygraphy_standin(trt, built: list, fail: str | None = None) -> types.ModuleType:
    """polygraphy.backend.trt's loaders: the config is applied at build time, as in polygraphy."""
    mod = types.ModuleType("polygraphy.backend.trt")

    class CreateConfig:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Profile(dict):
        def add(self, name, min, opt, max):  # noqa: A002 - polygraphy's argument names
            self[name] = (min, opt, max)

    def network_from_onnx_path(path):
        return ("builder", "network", path)

    def engine_bytes_from_network(network, config, save_timing_cache):
        # CreateConfig sets getattr(trt.BuilderFlag, "FP16") and reports an AttributeError as below.
        if config.kwargs.get("fp16") and not hasattr(trt.BuilderFlag, "FP16"):
            raise PolygraphyException(f"fp16 is not available on TensorRT version {trt.__version__}.")
        if fail:
            raise PolygraphyException(fail)
        built.append(config.kwargs)
        return b"plan"

    for obj in (CreateConfig, Profile, network_from_onnx_path, engine_bytes_from_network):
        setattr(mod, obj.__name__, obj)
    return mod


def entry(tmp_path, dtype="float32") -> GraphEntry:
    spec = vae_decoder_spec(TINY, dtype)
    return GraphEntry(tmp_path, spec.name, spec, f"{spec.name}.onnx", None, "k" * 64, "w" * 64, 0, {})


@pytest.fixture
def installed(monkeypatch):
    """install(version, context=None, fail=None) -> (tensorrt stand-in, configs built)."""
    def install(version, context=None, fail=None):
        trt, built = tensorrt_standin(version, context), []
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", polygraphy_standin(trt, built, fail))
        monkeypatch.setattr(trt_backend, "require_backend", lambda b: Availability(Backend.TRT, True, version=version))
        monkeypatch.setattr(trt_backend, "gpu_name", lambda: "Stand-in GPU sm_90")
        return trt, built

    return install


# ---------------------------------------------------------------- precision per TensorRT version

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tensorrt_10_gets_the_fp16_flag(installed, tmp_path, dtype):
    trt, built = installed("10.13.0.35")
    assert precision_flags(trt, dtype, BuildOptions()) == {"fp16": True}
    assert precision_flags(trt, dtype, BuildOptions(fp16=False)) == {}
    path = build_engine(entry(tmp_path, dtype))
    assert path.read_bytes() == b"plan" and built[0]["fp16"] is True


def test_tensorrt_11_takes_the_precision_from_the_graph(installed, tmp_path, caplog):
    trt, built = installed("11.4.0.106")
    with caplog.at_level(logging.WARNING, logger="pidrt.engines.trt_backend"):
        build_engine(entry(tmp_path / "fp16", "float16"))  # the default options, fp16=True
        assert not caplog.records
        build_engine(entry(tmp_path / "fp32", "float32"))
    assert [c.get("fp16") for c in built] == [None, None]  # the flag polygraphy would refuse is never passed
    assert "export with --fp16" in caplog.text and "float32 engine" in caplog.text


def test_polygraphy_failures_are_pidrt_errors_with_the_reason(installed, tmp_path):
    installed("11.4.0.106", fail="Failed to parse ONNX model. Does the model file exist and contain a valid ONNX model?")
    with pytest.raises(PidrtError, match=r"TensorRT 11.4.0.106 could not build .*Failed to parse ONNX model"):
        build_engine(entry(tmp_path))
    assert not list(tmp_path.glob("engines/*.plan"))


# ---------------------------------------------------------------- return values at run time

def runner(installed, tmp_path, context, monkeypatch, cuda_graph=False) -> TrtRunner:
    installed("11.4.0.106", context)
    (tmp_path / "e.plan").write_bytes(b"plan")
    spec = vae_decoder_spec(TINY, "float32")
    # CPU tensors stand in for CUDA ones: only the device check and the stream handle need a GPU.
    monkeypatch.setattr(trt_backend, "_require_cuda", lambda name, feed: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: types.SimpleNamespace(cuda_stream=7))
    return TrtRunner(spec, tmp_path / "e.plan", spec.profiles, cuda_graph=cuda_graph)


@pytest.mark.parametrize("fail,message", [
    (("shape", "latent"), r"refused shape \(1, 4, 8, 8\) for input 'latent'"),
    (("address", "latent"), "refused the address of input 'latent'"),
    (("address", "images"), "refused the address of output 'images'"),
    (("execute",), "execution failed .*execute_async_v3 returned false"),
])
def test_every_refusal_is_an_error_naming_the_tensor_or_step(installed, tmp_path, monkeypatch, fail, message):
    context = Context(fail=[fail])
    run = runner(installed, tmp_path, context, monkeypatch)
    with pytest.raises(PidrtError, match=message):
        run({"latent": torch.zeros(1, 4, 8, 8)})


def test_a_refused_profile_switch_is_an_error(installed, tmp_path, monkeypatch):
    run = runner(installed, tmp_path, Context(fail=[("profile", 1)]), monkeypatch)
    run.profiles = (run.profiles[0].__class__(batch=(1, 1, 1), height=(8, 8, 8), width=(8, 8, 8)), run.profiles[0])
    with pytest.raises(PidrtError, match="refused optimisation profile 1"):
        run({"latent": torch.zeros(2, 4, 8, 8)})


def test_a_plain_run_binds_and_executes_on_the_current_stream(installed, tmp_path, monkeypatch):
    context = Context()
    run = runner(installed, tmp_path, context, monkeypatch)
    feed = torch.zeros(2, 4, 8, 8)
    out = run({"latent": feed})["images"]
    assert out.shape == (2, 3, 64, 64)
    kind, stream, bound = context.calls[-1]
    assert kind == "execute" and stream == 7 and bound == {"latent": feed.data_ptr(), "images": out.data_ptr()}


# ---------------------------------------------------------------- CUDA graphs as trtexec captures them

class FakeGraphs:
    """torch.cuda's graph API as capture_graph uses it, recording the order of calls."""

    def __init__(self, monkeypatch, invalidate: bool = False):
        self.events, self.replays = [], 0
        fake = self

        class CUDAGraph:
            def replay(self):
                fake.events.append("replay")
                fake.replays += 1

        class graph:  # noqa: N801 - torch's name
            def __init__(self, g, capture_error_mode="global"):
                fake.events.append(f"begin capture ({capture_error_mode})")

            def __enter__(self):
                fake.capturing = True

            def __exit__(self, *exc):
                fake.capturing = False
                fake.events.append("end capture")
                if invalidate:  # what torch's capture_end raises for an invalidated capture
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: self.events.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: types.SimpleNamespace(cuda_stream=7))
        monkeypatch.setattr(torch.cuda, "set_stream", lambda s: self.events.append("restore stream"))
        self.capturing = False


def test_capture_synchronises_first_is_thread_local_and_checks_the_enqueue(monkeypatch):
    fake = FakeGraphs(monkeypatch)
    seen = []
    graph, why = capture_graph(lambda stream: seen.append((stream, fake.capturing)) or True)
    assert graph is not None and why == ""
    assert seen == [(7, True)]
    assert fake.events == ["synchronize", "begin capture (thread_local)", "end capture", "restore stream"]
    graph, why = capture_graph(lambda stream: False)
    assert graph is None and "execute_async_v3 returned false while capturing" in why


def test_an_invalidated_capture_is_reported_not_raised(monkeypatch):
    fake = FakeGraphs(monkeypatch, invalidate=True)
    graph, why = capture_graph(lambda stream: True)
    assert graph is None and "operation not permitted" in why
    assert fake.events[-1] == "restore stream"


@pytest.mark.parametrize("invalidate", [False, True])
def test_a_failed_capture_is_never_replayed(installed, tmp_path, monkeypatch, caplog, invalidate):
    context = Context()
    run = runner(installed, tmp_path, context, monkeypatch, cuda_graph=True)
    fake = FakeGraphs(monkeypatch, invalidate)
    if not invalidate:  # TensorRT's enqueue returns false inside the capture
        real = context.execute_async_v3
        context.execute_async_v3 = lambda stream: False if fake.capturing else real(stream)
    feed = torch.zeros(1, 4, 8, 8)
    with caplog.at_level(logging.WARNING, logger="pidrt.engines.trt_backend"):
        out = run({"latent": feed})["images"]
    assert fake.replays == 0 and not run.cuda_graph and run.capture_failure
    assert "cannot be captured in a CUDA graph" in caplog.text
    # The result is a plain run's, bound to this call's tensors (not the unwritten static buffers).
    kind, _, bound = context.calls[-1]
    assert kind == "execute" and bound == {"latent": feed.data_ptr(), "images": out.data_ptr()}
    run({"latent": feed})
    assert fake.replays == 0 and fake.events.count("synchronize") == 1  # no second attempt


def test_a_captured_engine_replays_while_shapes_repeat(installed, tmp_path, monkeypatch):
    context = Context()
    run = runner(installed, tmp_path, context, monkeypatch, cuda_graph=True)
    fake = FakeGraphs(monkeypatch)
    for _ in range(3):
        run({"latent": torch.zeros(1, 4, 8, 8)})
    assert fake.replays == 3 and fake.events.count("begin capture (thread_local)") == 1
    # One run before the capture (after the shape change), then the capture's own enqueue.
    assert [c[0] for c in context.calls].count("execute") == 2
    run({"latent": torch.zeros(2, 4, 8, 8)})
    assert fake.events.count("begin capture (thread_local)") == 2 and run.cuda_graph
