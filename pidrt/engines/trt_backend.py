"""The `trt` backend: TensorRT engines built through polygraphy, run on torch CUDA tensors.

Build: one optimisation profile per batch x resolution bucket (`Profile`s of the spec), builder
optimisation level, a timing cache file shared by all builds of a folder, optional refittable
engines. Precision: TensorRT 11 networks are strongly typed (each tensor keeps the graph's dtype,
and ``BuilderFlag.FP16`` is gone), so an fp16 engine is built from the fp16 export; on TensorRT 10
``BuildOptions.fp16`` also sets the (deprecated) flag that lets the builder pick fp16 kernels.
Engines are cached under `<export dir>/engines/`, named by a key of the graph key (weights +
spec), TensorRT version, GPU and build options; a refittable engine of the same structure is
refitted with new weights instead of rebuilt. Run: the name-based API (TensorRT 10 and 11) with
torch tensors bound by address on torch's current stream, every call's result checked; optional
CUDA graph capture per static input shape, done as trtexec does it (replayed while shapes
repeat, as in a denoising loop; an engine that cannot be captured runs without).

Graphs exported with plugin nodes (``--trt-plugins``) get pidrt's Triton kernels compiled into
the engine as ahead-of-time plugins (`pidrt.engines.trt_plugins`).

Written against the public APIs of TensorRT 10 and 11 and polygraphy >= 0.50.3; TensorRT cannot
be installed on the machines this was written on, so it is tested against stand-ins that behave
like TensorRT 10 and 11 (tests/engines/test_trt_backend.py) and on a GPU where one has TensorRT.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pidrt.engines.base import Availability, Backend, BackendUnavailable, GraphRunner, require_backend
from pidrt.errors import PidrtError, require
from pidrt.export.inputs import TORCH_DTYPES
from pidrt.export.manifest import GraphEntry
from pidrt.export.specs import ModelSpec, Profile
from pidrt.fileio import atomic_write

log = logging.getLogger(__name__)


def probe() -> Availability:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        return Availability(Backend.TRT, False, f"tensorrt is not importable ({exc}): pip install 'pidrt[trt]'")
    try:
        importlib.import_module("polygraphy.backend.trt")
    except ImportError as exc:
        return Availability(Backend.TRT, False, f"polygraphy is not importable ({exc}): pip install 'pidrt[trt]'",
                            version=trt.__version__)
    if not torch.cuda.is_available():
        return Availability(Backend.TRT, False, f"no CUDA GPU visible to torch {torch.__version__} "
                            f"(CUDA build: {torch.version.cuda or 'none'})", version=trt.__version__)
    return Availability(Backend.TRT, True, version=trt.__version__, devices=(gpu_name(),))


def gpu_name(device: int = 0) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = True  # TensorRT 10: BuilderFlag.FP16; TensorRT 11: precision is the graph's (precision_flags)
    optimization_level: int = 3  # TensorRT's default; 5 searches longest
    profiles: tuple[Profile, ...] | None = None  # None: the spec's (export-time) profiles
    refittable: bool = False
    workspace_gib: float | None = None
    cuda_graph: bool = False  # runners: capture per static shape


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def engine_paths(entry: GraphEntry, options: BuildOptions, trt_version: str, gpu: str) -> tuple[Path, str]:
    """(engine path, structure key): the path's name holds both the structure and the weights key."""
    profiles = options.profiles or entry.spec.profiles
    structure = {"spec": entry.spec.to_json(), "trt": trt_version, "gpu": gpu,
                 "options": {**asdict(options), "profiles": [asdict(p) for p in profiles], "cuda_graph": None}}
    if entry.spec.plugins:  # the engine embeds the kernels' PTX: a kernel edit must rebuild it
        from pidrt.engines.trt_plugins import kernels_fingerprint

        structure["kernels"] = kernels_fingerprint()
    skey = hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()
    return entry.dir / "engines" / f"{entry.name}-{skey[:16]}-{entry.key[:16]}.plan", skey


def precision_flags(trt, graph_dtype: str, options: BuildOptions) -> dict[str, bool]:
    """CreateConfig's precision arguments for this TensorRT and graph.

    TensorRT 10 builds weakly typed networks by default: ``BuilderFlag.FP16`` (deprecated there)
    lets it run fp32 layers in fp16. TensorRT 11 removed the flag (polygraphy then refuses
    ``fp16=True``): networks are strongly typed and each tensor keeps the graph's dtype, so the
    precision is chosen at export (``pidrt export --fp16``).
    """
    if not options.fp16:
        return {}
    if hasattr(trt.BuilderFlag, "FP16"):
        return {"fp16": True}
    if graph_dtype != "float16":
        log.warning("TensorRT %s has no fp16 builder flag: precision comes from the graph, so this %s graph "
                    "builds an %s engine; export with --fp16 for an fp16 engine", trt.__version__, graph_dtype,
                    graph_dtype)
    return {}


def build_engine(entry: GraphEntry, options: BuildOptions = BuildOptions()) -> Path:
    """The engine for `entry` (cached; refitted from a same-structure engine when refittable)."""
    info = require_backend(Backend.TRT)
    trt = require("tensorrt", "trt")
    path, skey = engine_paths(entry, options, info.version, gpu_name())
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if options.refittable:
        sibling = next(iter(sorted(path.parent.glob(f"{entry.name}-{skey[:16]}-*.plan"))), None)
        if sibling is not None:
            engine = _deserialize(trt, sibling.read_bytes())
            refit(engine, entry.path)
            atomic_write(path, bytes(engine.serialize()))
            return path
    from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.backend.trt import Profile as TrtProfile
    from polygraphy.exception import PolygraphyException

    profiles = []
    for profile in options.profiles or entry.spec.profiles:
        p = TrtProfile()
        for name, (lo, opt, hi) in entry.spec.profile_shapes(profile).items():
            p.add(name, min=lo, opt=opt, max=hi)
        profiles.append(p)
    timing = path.parent / "timing.cache"
    pools = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * 2**30)} if options.workspace_gib else None
    config = CreateConfig(**precision_flags(trt, entry.spec.dtype, options), profiles=profiles,
                          builder_optimization_level=options.optimization_level,
                          refittable=options.refittable, memory_pool_limits=pools,
                          load_timing_cache=str(timing) if timing.is_file() else None)
    if entry.spec.plugins:
        from pidrt.engines.trt_plugins import register

        register()  # the parser maps the graph's pidrt nodes to these; the engine embeds their PTX
    try:
        # The path form lets the parser read external data (UNets over 2 GB) next to the graph.
        network = network_from_onnx_path(str(entry.path))
        blob = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing))
    except PolygraphyException as exc:  # polygraphy raises on a parse or build failure, after logging it
        raise PidrtError(f"TensorRT {trt.__version__} could not build {entry.path}: {exc} "
                         "(TensorRT's log above has the details)") from exc
    atomic_write(path, bytes(blob))
    return path


def _deserialize(trt, blob: bytes):
    engine = trt.Runtime(_logger(trt)).deserialize_cuda_engine(blob)
    if engine is None:
        raise PidrtError("TensorRT could not deserialize the engine (built by another version or GPU?)")
    return engine


def refit(engine, onnx_path: Path) -> None:
    """Load new weights from an ONNX graph of the same structure into a refittable engine."""
    trt = require("tensorrt", "trt")
    logger = _logger(trt)
    refitter = trt.Refitter(engine, logger)
    if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(onnx_path)):
        raise PidrtError(f"{onnx_path}: TensorRT could not read refit weights from the graph")
    if not refitter.refit_cuda_engine():
        raise PidrtError(f"{onnx_path}: refitting failed (the engine was not built refittable, or weights are missing)")


def _require_cuda(name: str, feed: dict[str, torch.Tensor]) -> torch.device:
    device = next(iter(feed.values())).device
    if device.type != "cuda":
        raise PidrtError(f"{name}: the trt backend takes CUDA tensors, got {device}")
    return device


def capture_graph(enqueue) -> tuple[object | None, str]:
    """Capture ``enqueue(stream handle) -> bool`` into a CUDA graph as trtexec does: (graph, "") or (None, why).

    The device is synchronised first (nothing of the warm-up run may end up in the graph), the
    capture is thread-local (other threads' CUDA calls neither break it nor are broken by it),
    and the enqueue's own result counts: TensorRT returns false when its work cannot be
    captured, and a graph ended after that would replay without having written the outputs.
    """
    torch.cuda.synchronize()
    previous = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    ok = False
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            ok = enqueue(torch.cuda.current_stream().cuda_stream)
    except RuntimeError as exc:  # the capture was invalidated (an operation a capture forbids)
        return None, f"the capture failed: {exc}"
    finally:
        torch.cuda.set_stream(previous)  # torch leaves the capture stream current when capture_end raises
    if not ok:
        return None, "execute_async_v3 returned false while capturing (work a CUDA graph cannot hold)"
    return graph, ""


class TrtRunner(GraphRunner):
    backend = Backend.TRT

    def __init__(self, spec: ModelSpec, engine_path: Path, profiles: tuple[Profile, ...], cuda_graph: bool = False):
        super().__init__(spec)
        trt = require("tensorrt", "trt")
        self.engine = _deserialize(trt, Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PidrtError(f"{spec.name}: TensorRT could not create an execution context (out of device memory?)")
        self.profiles = profiles
        self.profile_index = 0
        self.cuda_graph = cuda_graph
        self.capture_failure = ""  # why this engine runs without CUDA graphs although asked to
        self._graph = None  # (shape key, CUDAGraph, static inputs, static outputs)

    def _select_profile(self, env, stream) -> None:
        for i, p in enumerate(self.profiles):
            # Text-encoder graphs have no latent axes: only their batch range counts.
            h, w = env.get("height", p.height[1]), env.get("width", p.width[1])
            if p.contains(env["batch"], h, w):
                if i != self.profile_index:
                    if not self.context.set_optimization_profile_async(i, stream):
                        raise PidrtError(f"{self.spec.name}: TensorRT refused optimisation profile {i} {p}")
                    self.profile_index = i
                return
        raise PidrtError(f"{self.spec.name}: batch {env['batch']}, latent {env.get('height')}x{env.get('width')} "
                         f"is outside every engine profile {self.profiles}; rebuild with a profile that covers it")

    def _bind(self, feed, device) -> dict[str, torch.Tensor]:
        """Set every input's shape and address, allocate the outputs; any refusal is an error naming the tensor."""
        for name, t in feed.items():
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise PidrtError(f"{self.spec.name}: TensorRT refused shape {tuple(t.shape)} for input '{name}' "
                                 f"(outside optimisation profile {self.profile_index}?)")
            if not self.context.set_tensor_address(name, t.data_ptr()):
                raise PidrtError(f"{self.spec.name}: TensorRT refused the address of input '{name}'")
        outs = {}
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise PidrtError(f"{self.spec.name}: TensorRT could not infer the shape of output '{t.name}' "
                                 f"from the inputs (got {shape})")
            outs[t.name] = torch.empty(shape, dtype=TORCH_DTYPES[t.dtype], device=device)
            if not self.context.set_tensor_address(t.name, outs[t.name].data_ptr()):
                raise PidrtError(f"{self.spec.name}: TensorRT refused the address of output '{t.name}'")
        return outs

    def _execute(self, stream: int, step: str) -> None:
        if not self.context.execute_async_v3(stream):
            # Never hand back the outputs: they were not written.
            raise PidrtError(f"{self.spec.name}: TensorRT execution failed ({step}: execute_async_v3 returned "
                             "false; TensorRT's log has the reason)")

    def _run(self, feed, env):
        feed = {k: v.contiguous() for k, v in feed.items()}
        device = _require_cuda(self.spec.name, feed)
        stream = torch.cuda.current_stream().cuda_stream
        self._select_profile(env, stream)
        if self.cuda_graph:
            return self._run_graph(feed, device, stream)
        outs = self._bind(feed, device)
        self._execute(stream, "run")
        return outs

    def _run_graph(self, feed, device, stream):
        key = tuple((k, tuple(v.shape)) for k, v in sorted(feed.items()))
        if self._graph is None or self._graph[0] != key:
            self._graph = None
            static_in = {k: v.clone() for k, v in feed.items()}
            static_out = self._bind(static_in, device)
            # TensorRT must run once after a shape change before its work can be captured.
            self._execute(stream, "the run before a CUDA graph capture")
            graph, why = capture_graph(self.context.execute_async_v3)
            if graph is None:
                self.cuda_graph, self.capture_failure = False, why
                log.warning("%s: this TensorRT engine cannot be captured in a CUDA graph (%s); running it "
                            "without CUDA graphs from now on", self.spec.name, why)
                outs = self._bind(feed, device)
                self._execute(stream, "run")
                return outs
            self._graph = (key, graph, static_in, static_out)
        _, graph, static_in, static_out = self._graph
        for k, v in feed.items():
            static_in[k].copy_(v)
        graph.replay()
        # Clones: the static buffers are overwritten by the next replay.
        return {k: v.clone() for k, v in static_out.items()}

    def close(self) -> None:
        self._graph = None
        self.context = None
        self.engine = None


def open_runner(entry: GraphEntry, models=None, options: BuildOptions = BuildOptions(),
                build: bool = True) -> TrtRunner:
    """A runner on the cached engine for `entry`, building it first when `build` (else it must exist)."""
    info = require_backend(Backend.TRT)
    path, _ = engine_paths(entry, options, info.version, gpu_name())
    if not path.is_file():
        if not build:
            raise BackendUnavailable(f"{path}: no engine; run `pidrt build {entry.dir}` first")
        path = build_engine(entry, options)
    return TrtRunner(entry.spec, path, options.profiles or entry.spec.profiles, options.cuda_graph)
