"""Choose and build a backend: `BackendOptions` in, the pipeline the Generator runs out.

The one place every entry point goes through (`pidrt serve`, `pidrt generate`, `pidrt bench`,
the Ray Serve replicas, `pidrt.serve.factory.build_generator`), so a backend added here is
everywhere:

- `torch`: the reference `Pipeline` as it is.
- `fast`: `pidrt.engines.fast_torch` (CUDA graphs of the whole UNet step per bucket, Triton
  identity kernels, fp16/bf16, channels_last). Converts the models in place unless `copy_models`.
- `ort` / `trt`: exported graphs on onnxruntime / TensorRT (`graph_pipeline`), from `--engines`
  or the engine cache; lean (no torch UNet kept) unless `keep_torch_unet`.
- `auto`: fast on CUDA, torch on CPU. On CUDA it first compares one UNet step of the fast path with
  the reference (`AUTO_RTOL`) and falls back to torch, with the reason logged, if they disagree or
  the fast path fails to build.

`preflight` checks, before any model is loaded, that the chosen backend can run here, so a server
fails at start with the reason and the fix, never mid-request. `open_backend` then builds it and
warms every declared bucket (`warmup`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pidrt.engines.base import BackendUnavailable, require_backend
from pidrt.engines.lean import LEAN_EAA, projections_only, torch_bytes
from pidrt.engines.options import GRAPH_BACKENDS, METHODS, BackendOptions, Buckets
from pidrt.errors import PidrtError

log = logging.getLogger(__name__)

# How far `auto`'s check lets one fast UNet step be from the reference (relative L2 of the noise
# prediction): fp16/bf16 rounding of a whole UNet, the bounds the fast backend's tests hold.
AUTO_RTOL = {torch.float16: 2e-2, torch.bfloat16: 4e-2, torch.float32: 1e-3}


@dataclass
class OpenedBackend:
    """A built backend: `pipeline` is what the Generator runs; `admit` refuses what it cannot."""

    name: str  # torch | fast | ort | trt (what runs, after auto's choice)
    requested: str
    pipeline: object
    buckets: Buckets | None
    methods: tuple[str, ...]  # identity methods it runs ("none" = no identity)
    info: dict = field(default_factory=dict)
    base_fingerprint: str | None = None  # set when the torch models were dropped (the enroller needs it)
    retouch_blocks: tuple[int, int] | None = None  # ort / trt: the UNet graphs' retouch inputs

    def admit(self, request) -> None:
        """InvalidRequest (HTTP 400) for a resolved request this backend was not prepared for."""
        from pidrt.runtime.requests import InvalidRequest

        # A malformed id's "method" is left to the identity lookup (404 unknown identity).
        if request.method in METHODS and request.method not in self.methods:
            raise InvalidRequest(f"{request.method} identities are not served here: this {self.name} server loaded "
                                 f"the UNet graphs of {list(self.methods)} (start it with --methods including "
                                 f"{request.method})")
        if self.buckets is not None:
            self.buckets.check(request.width, request.height, request.n)
        if getattr(request, "retouch", None) is not None:
            from pidrt.runtime.retouch_serving import check_backend

            check_backend(request, self.name, self.retouch_blocks, self.info.get("lean", False))

    def report(self) -> dict:
        own = getattr(self.pipeline, "report", None)
        return {**self.info, **({"fast": own()} if callable(own) else {})}

    def close(self) -> None:
        close = getattr(self.pipeline, "close", None)
        if callable(close):
            close()


def resolve(requested: str, device: str | torch.device) -> str:
    if requested == "auto":
        return "fast" if torch.device(device).type == "cuda" else "torch"
    return requested


def preflight(options: BackendOptions, device: str | torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend `options` resolve to on `device`, or BackendUnavailable saying why and how to fix it."""
    return _preflight(options, device, dtype)[0]


def _preflight(options: BackendOptions, device, dtype) -> tuple[str, str | None]:
    """(backend, why auto fell back to torch or None)."""
    name, device = resolve(options.backend, device), torch.device(device)
    if name == "fast":
        try:
            if options.fast is None and device.type != "cuda":
                raise BackendUnavailable(
                    f"the fast backend runs on a CUDA GPU (CUDA graphs, Triton kernels); this runs on {device} "
                    f"(torch.cuda.is_available() = {torch.cuda.is_available()}). Use --backend torch (or auto), "
                    "or --device cuda on a GPU machine")
            fast_config(options, dtype or torch.float16).check_device(device)
        except PidrtError as exc:
            if options.backend != "auto":
                raise
            log.warning("auto backend: falling back to torch: %s", exc)  # e.g. a GPU without Triton
            return "torch", f"the fast backend cannot run here: {exc}"
    elif name in GRAPH_BACKENDS:
        require_backend(name)
        if name == "trt" and device.type != "cuda":
            raise BackendUnavailable(f"the trt backend runs TensorRT engines on CUDA tensors; pass --device cuda "
                                     f"(got {device})")
        if dtype is not None and dtype not in (torch.float32, torch.float16):
            raise BackendUnavailable(f"the {name} backend runs graphs exported in float32 or float16, not {dtype}")
        if options.engines is not None:
            from pidrt.export.manifest import read_manifest

            read_manifest(options.engines)  # a clear error when it is not an export folder
        else:
            from pidrt.engines.engine_cache import check_writable, default_cache_dir

            check_writable(options.cache_dir or default_cache_dir())
    return name, None


def fast_config(options: BackendOptions, dtype: torch.dtype):
    from pidrt.engines.fast_torch import FastTorchConfig

    return options.fast or FastTorchConfig(dtype=dtype)


def default_methods(encoders) -> tuple[str, ...]:
    return ("none",) + tuple(m for m in ("sca", "ip", "eaa") if getattr(encoders, m, None) is not None)


def open_backend(options: BackendOptions, pipe, encoders=None, *, max_batch: int = 8, copy_models: bool = False,
                 capturer=None, on_stage: Callable[[str], None] | None = None, progress: bool = True) -> OpenedBackend:
    """Build the backend `options` name over `pipe` (a reference `Pipeline`) and warm its buckets.

    copy_models: fast works on a copy of the models (the reference `pipe` stays usable; twice the
    memory). capturer: the fast backend's graph capturer (tests inject `cuda_graphs.EagerCapturer`).
    on_stage(text): what is being done now (a server's /readyz shows it).
    """
    stage = on_stage or (lambda text: None)
    name, fallback = _preflight(options, pipe.device, pipe.dtype)
    preset = pipe.models.preset
    buckets = options.buckets
    if buckets is None and name != "torch":
        buckets = Buckets.default(preset.resolution, max_batch)
    if buckets is not None and buckets.max_batch() < max_batch:
        raise PidrtError(f"max_batch {max_batch} is larger than the largest bucket ({buckets}); declare a bucket of "
                         f"{max_batch} images or lower --max-batch")
    methods = options.methods or default_methods(encoders)
    info: dict = {"backend": name, "requested": options.backend, "device": str(pipe.device),
                  "dtype": str(pipe.dtype).removeprefix("torch."), "torch": torch.__version__,
                  "buckets": str(buckets) if buckets is not None else None, "fallback": fallback}
    opened = OpenedBackend(name, options.backend, pipe, buckets, METHODS, info)
    clock = time.perf_counter()
    if name == "fast":
        config = fast_config(options, pipe.dtype)
        # Room for a graph per bucket and method, and as many again for undeclared shapes.
        config = dataclasses.replace(config, max_buckets=max(config.max_buckets,
                                                             2 * len(buckets.buckets) * len(methods)))
        stage("building the fast backend")
        if options.backend == "auto":
            opened.pipeline, opened.name, info["fallback"] = _auto(pipe, config, buckets, capturer)
            info["backend"] = opened.name
        else:
            from pidrt.engines.fast_torch import make_fast

            opened.pipeline = make_fast(pipe, config, copy_models=copy_models, capturer=capturer)
    elif name in GRAPH_BACKENDS:
        opened.methods, opened.retouch_blocks = methods, options.retouch_blocks
        info["retouch_blocks"] = list(options.retouch_blocks) if options.retouch_blocks else None
        info["version"] = require_backend(name).version  # onnxruntime's / TensorRT's
        opened.pipeline, info["graphs"] = _open_graph_backend(name, pipe, encoders, options, methods, buckets, stage,
                                                              progress)
        if not options.keep_torch_unet:
            from pidrt.identity.enroll import base_fingerprint

            opened.base_fingerprint = base_fingerprint(pipe.models)  # before the weights it hashes go
            projections_only(opened.pipeline)
            opened.pipeline.record_unavailable = LEAN_EAA.format(backend=name)
        info["lean"] = not options.keep_torch_unet
    info["setup_s"] = round(time.perf_counter() - clock, 3)
    info["torch_bytes"] = torch_bytes(opened.pipeline.models)  # what the process holds of torch weights
    if options.warmup and buckets is not None:
        from pidrt.engines.warmup import warm_up

        info["warmup_s"] = warm_up(opened.pipeline, buckets, _specs(pipe, encoders, methods), stage, progress)
    return opened


def _specs(pipe, encoders, methods) -> dict:
    """The UNet spec of each method to warm (its identity input shapes give the warm-up's zeros)."""
    from pidrt.engines.graph_pipeline import spec_options
    from pidrt.export.specs import model_spec

    dtype = "float16" if pipe.dtype == torch.float16 else "float32"
    return {m: model_spec("unet", pipe.models.preset, pipe.layers, m, dtype, spec_options(encoders, m)) for m in methods}


def _open_graph_backend(name, pipe, encoders, options: BackendOptions, methods, buckets, stage, progress):
    from pidrt.engines.engine_cache import EngineCache
    from pidrt.engines.graph_pipeline import open_graphs

    info = require_backend(name)
    cache = None if options.engines is not None else EngineCache(options.cache_dir)
    return open_graphs(name, pipe, encoders, methods, buckets, engines=options.engines, cache=cache,
                       threads=options.threads, info=info, stage=stage, progress=progress,
                       retouch_blocks=options.retouch_blocks)


def _auto(pipe, config, buckets: Buckets, capturer) -> tuple[object, str, str | None]:
    """(pipeline, name, why it fell back or None): fast if one UNet step agrees with the reference."""
    from pidrt.engines.fast_torch import make_fast

    bucket = buckets.buckets[0]
    scale = pipe.models.preset.latent_scale
    g = torch.Generator().manual_seed(0)
    channels = pipe.models.unet.config.in_channels
    x = torch.randn(2 * bucket.batch, channels, bucket.height // scale, bucket.width // scale, generator=g)
    x = x.to(pipe.device, pipe.dtype)
    ctx = pipe.encode_text([""] * bucket.batch + ["a photo of a person"] * bucket.batch)
    try:
        want = pipe.unet(x, 500, ctx).float()
        fast = make_fast(pipe, config, copy_models=True, capturer=capturer)
        got = fast.unet(x, 500, ctx).float()
        err = float((got - want).norm() / want.norm().clamp_min(1e-12))
        tol = AUTO_RTOL[config.dtype]
        if torch.isfinite(got).all() and err <= tol:
            log.info("auto backend: fast (one UNet step within %.1e of the reference: %.2e)", tol, err)
            return fast, "fast", None
        reason = f"one fast UNet step differs from the reference by {err:.2e} (relative L2), above {tol:.0e}"
    except Exception as exc:  # noqa: BLE001 - any failure of the fast path means: serve the reference
        reason = f"the fast backend failed to start: {type(exc).__name__}: {exc}"
    log.warning("auto backend: falling back to torch: %s", reason)
    return pipe, "torch", reason
