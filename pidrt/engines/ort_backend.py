"""The `ort` backend: onnxruntime sessions on the exported graphs.

CPU execution provider by default (what CI runs). With onnxruntime-gpu, the CUDA or TensorRT
execution provider runs the graph and torch CUDA tensors are bound by address (IO binding):
no host round trip, outputs written straight into torch tensors.

A graph exported with TensorRT plugin nodes (``pidrt export --trt-plugins``) runs here with the
nodes rewritten to the same maths in plain ops (`lower_plugin_nodes`), so `pidrt verify` checks
such a graph, all but the kernels themselves, on any machine.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pidrt.engines.base import Availability, Backend, BackendUnavailable, GraphRunner
from pidrt.errors import require
from pidrt.export.inputs import TORCH_DTYPES
from pidrt.export.manifest import GraphEntry
from pidrt.export.specs import ModelSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}


def probe() -> Availability:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        return Availability(Backend.ORT, False, f"onnxruntime is not importable ({exc}): pip install 'pidrt[onnx]'")
    providers = ort.get_available_providers()
    devices = ("cpu",) + (("cuda",) if PROVIDERS["cuda"] in providers and torch.cuda.is_available() else ())
    return Availability(Backend.ORT, True, version=ort.__version__, devices=devices,
                        details={"providers": providers})


def choose_providers(requested: Sequence[str] | None, available: Sequence[str], cache_dir: Path | None) -> list:
    """Requested short names (cpu, cuda, tensorrt) -> onnxruntime's provider list with options.

    Default: CUDA when onnxruntime-gpu and a GPU are there, else CPU. TensorRT EP only on request:
    its first run builds engines (minutes); its caches go under `cache_dir`.
    """
    if not requested:
        requested = ["cuda", "cpu"] if PROVIDERS["cuda"] in available and torch.cuda.is_available() else ["cpu"]
    unknown = [r for r in requested if r not in PROVIDERS]
    missing = [r for r in requested if r in PROVIDERS and PROVIDERS[r] not in available]
    if unknown or missing:
        raise BackendUnavailable(f"onnxruntime providers {unknown + missing} not available (have {list(available)}; "
                                 "CUDA/TensorRT need onnxruntime-gpu)")
    out = []
    for r in requested:
        if r == "tensorrt":
            cache = str(cache_dir or Path.cwd())
            out.append((PROVIDERS[r], {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                       "trt_engine_cache_path": cache, "trt_timing_cache_enable": True,
                                       "trt_timing_cache_path": cache}))
        else:
            out.append(PROVIDERS[r])
    return out


class OrtRunner(GraphRunner):
    backend = Backend.ORT

    def __init__(self, spec: ModelSpec, path: Path | str, providers: Sequence[str] | None = None,
                 threads: int | None = None, cache_dir: Path | None = None):
        super().__init__(spec)
        ort = require("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its graph optimiser warns per node it leaves alone
        if threads:
            options.intra_op_num_threads = threads
        chosen = choose_providers(providers, ort.get_available_providers(), cache_dir)
        source: str | bytes = str(path)
        if spec.plugins:
            from pidrt.export.plugin_nodes import lower_plugin_nodes

            onnx = require("onnx", "onnx")
            source = lower_plugin_nodes(onnx.load(source, load_external_data=False)).SerializeToString()
            # From bytes, onnxruntime finds external weights only when told the graph's folder.
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(path).parent))
        self.session = ort.InferenceSession(source, options, providers=chosen)
        self.on_gpu = self.session.get_providers()[0] != PROVIDERS["cpu"]

    def _run(self, feed, env):
        device = next(iter(feed.values())).device
        if self.on_gpu and device.type == "cuda":
            return self._run_bound(feed, env, device)
        arrays = {k: v.detach().cpu().numpy() for k, v in feed.items()}
        outs = self.session.run(self.spec.output_names, arrays)
        return {n: torch.from_numpy(o).to(device) for n, o in zip(self.spec.output_names, outs)}

    def _run_bound(self, feed, env, device):
        binding = self.session.io_binding()
        index = device.index or 0
        keep = []  # contiguous copies must outlive the run
        for name, t in feed.items():
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", index, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        outs = {}
        for name, shape in self.spec.output_shapes(env).items():
            dtype = TORCH_DTYPES[next(t.dtype for t in self.spec.outputs if t.name == name)]
            out = torch.empty(shape, dtype=dtype, device=device)
            binding.bind_output(name, "cuda", index, _NP[dtype], shape, out.data_ptr())
            outs[name] = out
        # onnxruntime runs on its own stream: the inputs torch queued must be complete first.
        torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)
        return outs

    def close(self) -> None:
        self.session = None


def open_runner(entry: GraphEntry, models=None, providers: Sequence[str] | None = None,
                threads: int | None = None) -> OrtRunner:
    return OrtRunner(entry.spec, entry.path, providers, threads, cache_dir=entry.dir / "engines" / "ort-trt")
