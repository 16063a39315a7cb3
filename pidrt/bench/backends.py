"""Small adapters from a backend name to a pipeline the harness can time, or the reason it cannot run.

- `torch`: the reference `Pipeline` itself.
- `fast_torch`: `pidrt.engines.fast_torch.make_fast` (GPU only: fp16/bf16, CUDA graphs, Triton
  kernels). It converts the models in place (no second copy in device memory), so the harness
  runs it last.
- `ort` / `trt`: the pipeline's text encoder, UNet (one graph per method) and VAE decoder calls
  go through exported ONNX graphs (`RunnerPipeline`), exported into `export_dir` (cached by key:
  a second run re-uses them) and run on onnxruntime or TensorRT.

A backend that is missing, or cannot run on this machine, comes back with `available=False`
and a reason; a method a backend cannot run (e.g. EAA's recompute placement through a graph)
is reported by the harness as a skipped case with the error's message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pidrt.errors import PidrtError


@dataclass
class BackendRun:
    name: str
    available: bool
    reason: str = ""
    info: dict = field(default_factory=dict)
    _pipeline_for: object = None  # method -> Pipeline
    _close: object = None

    def pipeline(self, method: str):
        return self._pipeline_for(method)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def unavailable(name: str, reason: str, **info) -> BackendRun:
    return BackendRun(name, False, reason, info)


def open_backend(name: str, pipe, encoders, export_dir: Path, batch_sizes, height: int, width: int,
                 threads: int | None = None) -> BackendRun:
    try:
        if name == "torch":
            return BackendRun("torch", True, info={"torch": torch.__version__, "device": str(pipe.device),
                                                    "dtype": str(pipe.dtype).removeprefix("torch.")},
                              _pipeline_for=lambda method: pipe)
        if name == "fast_torch":
            return _open_fast(pipe)
        if name in ("ort", "trt"):
            return _open_graphs(name, pipe, encoders, export_dir, batch_sizes, height, width, threads)
    except PidrtError as exc:
        return unavailable(name, str(exc))
    except Exception as exc:  # noqa: BLE001 - an export or engine build that breaks must not end the run
        return unavailable(name, f"setup failed: {type(exc).__name__}: {exc}")
    raise PidrtError(f"unknown backend {name!r}")


def _open_fast(pipe) -> BackendRun:
    try:
        from pidrt.engines.fast_torch import FastTorchConfig, make_fast
    except ImportError as exc:
        return unavailable("fast_torch", f"pidrt.engines.fast_torch is not importable here ({exc})")
    if pipe.device.type != "cuda":
        return unavailable("fast_torch", f"GPU only (CUDA graphs, Triton kernels, fp16); this run is on "
                                         f"{pipe.device.type} (torch.cuda.is_available() = {torch.cuda.is_available()})")
    config = FastTorchConfig(dtype=pipe.dtype)
    start = time.perf_counter()
    # copy_models=False: the reference weights are converted in place; the harness runs this backend last.
    fast = make_fast(pipe, config, copy_models=False)
    info = {"config": {k: str(v) for k, v in vars(config).items()}, "setup_s": time.perf_counter() - start}
    run = BackendRun("fast_torch", True, info=info, _pipeline_for=lambda method: fast)
    run.report = getattr(fast, "report", None)
    return run


def _spec_options(encoders, method: str):
    from pidrt.export.specs import SpecOptions

    n_tokens = 4
    adapter = {"sca": encoders.sca, "ip": encoders.ip}.get(method)
    if adapter is not None:
        n_tokens = adapter.n_tokens
    s_c = encoders.eaa.s_c if (method == "eaa" and encoders.eaa is not None) else None
    return SpecOptions(n_tokens=n_tokens, eaa_cross_tokens=s_c)


def _open_graphs(name: str, pipe, encoders, export_dir: Path, batch_sizes, height: int, width: int,
                 threads: int | None) -> BackendRun:
    from pidrt.engines.base import availability

    info = availability(name)
    if not info.available:
        return unavailable(name, info.reason, version=info.version)
    if pipe.dtype not in (torch.float32, torch.float16):
        return unavailable(name, f"graphs are exported in float32 or float16, not {pipe.dtype}")
    from pidrt.engines.pipeline_adapter import RunnerPipeline
    from pidrt.engines.runners import (
        Runners,
        TextRunner,
        UNetRunner,
        VAEDecoderRunner,
        open_graph,
    )
    from pidrt.export.commands import ExportOptions, export_models
    from pidrt.export.manifest import find_graph

    models, fp16 = pipe.models, pipe.dtype == torch.float16
    dtype = "float16" if fp16 else "float32"
    export_dir = Path(export_dir)
    options: dict = {}
    if name == "ort" and threads:
        options["threads"] = threads
    if name == "trt":
        from pidrt.engines.trt_backend import BuildOptions
        from pidrt.export.specs import Profile

        scale = models.preset.latent_scale
        hi = 2 * max(batch_sizes)  # CFG doubles the UNet and text batches
        h, w = height // scale, width // scale
        options["options"] = BuildOptions(profiles=(Profile((1, hi, hi), (h, h, h), (w, w, w)),))
    result = {"version": info.version, "export_dir": str(export_dir), "dtype": dtype, "export_s": {},
              "open_s": {}, "details": info.details}

    def export(kind: str, method: str = "none") -> None:
        start = time.perf_counter()
        export_models(models, method, export_dir, fp16,
                      ExportOptions(kinds=(kind,), spec=_spec_options(encoders, method)))
        result["export_s"][f"{kind}:{method}" if kind == "unet" else kind] = time.perf_counter() - start

    def open_(kind: str, method: str = "none"):
        start = time.perf_counter()
        graph = open_graph(find_graph(export_dir, kind, method, dtype), name, models, **options)
        result["open_s"][f"{kind}:{method}" if kind == "unet" else kind] = time.perf_counter() - start
        return graph

    export("text_encoder")
    export("vae_decoder")
    text, vae = TextRunner(open_("text_encoder")), VAEDecoderRunner(open_("vae_decoder"))
    runner_pipe = RunnerPipeline(models, Runners(text_encoder=text, vae_decoder=vae), pipe.device, pipe.dtype)
    unets: dict[str, UNetRunner] = {}

    def pipeline_for(method: str):
        if method not in unets:
            for old in unets.values():  # one UNet session at a time (device memory)
                old.graph.close()
            unets.clear()
            export("unet", method)
            unets[method] = UNetRunner(open_("unet", method))
        runner_pipe.runners = Runners(unet=unets[method], text_encoder=text, vae_decoder=vae)
        return runner_pipe

    def close():
        for runner in [*unets.values(), text, vae]:
            runner.graph.close()
        unets.clear()

    return BackendRun(name, True, info=result, _pipeline_for=pipeline_for, _close=close)
