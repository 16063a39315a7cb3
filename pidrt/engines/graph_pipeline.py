"""The ort / trt backends as a Generator pipeline: one UNet graph per identity method, cached engines.

`open_graphs` finds each graph a server needs (text encoder, VAE decoder, a UNet per loaded
method) in the user's export folder (`--engines`) or in the engine cache, exporting (and for trt
building) what is missing, and opens them on the backend. `GraphPipeline` routes each UNet call to
the graph of the batch's method, read from the payloads in the branch state: identities stay data,
so one graph serves every identity of its method and a batch mixes identities and scales freely.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from pidrt import __version__
from pidrt.engines.base import Availability
from pidrt.engines.engine_cache import CACHE_FORMAT, EngineCache
from pidrt.engines.pipeline_adapter import LAYER_CONTEXTS, RunnerPipeline
from pidrt.engines.runners import Runners, TextRunner, UNetRunner, VAEDecoderRunner, open_graph
from pidrt.errors import PidrtError
from pidrt.export.manifest import GraphEntry, find_graph
from pidrt.export.specs import Profile, SpecOptions, model_spec
from pidrt.models.attention import FoldedLayer, Payload, UnfoldedBranch

_QUERY_METHOD = {"z": "sca", "x": "ip"}


def payload_method(layers: dict[str, Payload]) -> str:
    """The identity method a batch's payloads belong to ("none" without payloads)."""
    if not layers:
        return "none"
    p = next(iter(layers.values()))
    if isinstance(p, (FoldedLayer, UnfoldedBranch)):
        return _QUERY_METHOD[p.query]
    return "eaa"  # EAAKV; EAARows (recompute) reaches the eaa graph's feed check, which explains the refusal


class GraphPipeline(RunnerPipeline):
    """A `RunnerPipeline` with a UNet runner per method; `record_unavailable` says why EAA
    enrollment cannot run here (a lean server), or is None."""

    def __init__(self, models, unets: dict[str, UNetRunner], runners: Runners, device, dtype, backend: str):
        super().__init__(models, runners, device, dtype)
        self.unets, self.backend = unets, backend
        self.record_unavailable: str | None = None

    @property
    def layer_contexts_unavailable(self) -> str | None:
        return LAYER_CONTEXTS if self.unets else None

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t, ctx: torch.Tensor) -> torch.Tensor:
        if self.state.record is None:
            method = payload_method(self.state.layers)
            if method not in self.unets:
                raise PidrtError(f"this {self.backend} server has no UNet graph for {method} identities "
                                 f"(loaded: {sorted(self.unets)}); start it with --methods including {method}")
            self.runners.unet = self.unets[method]
        return super().unet(x, t, ctx)

    def close(self) -> None:
        for runner in [*self.unets.values(), self.runners.text_encoder, self.runners.vae_decoder]:
            if runner is not None:
                runner.graph.close()
        self.unets.clear()


def spec_options(encoders, method: str, profiles: tuple[Profile, ...] | None = None) -> SpecOptions:
    """The graph's shape knobs that come from the adapters: tokens per identity, EAA's s_c."""
    adapter = {"sca": getattr(encoders, "sca", None), "ip": getattr(encoders, "ip", None)}.get(method)
    eaa = getattr(encoders, "eaa", None)
    return SpecOptions(n_tokens=adapter.n_tokens if adapter is not None else 4,
                       eaa_cross_tokens=eaa.s_c if method == "eaa" and eaa is not None else None, profiles=profiles)


def trt_profiles(buckets, latent_scale: int) -> tuple[Profile, ...]:
    """One TensorRT profile per bucket resolution: batch 1 .. 2 x its largest bucket (CFG doubles it)."""
    out = []
    for w, h in buckets.sizes:
        hi = 2 * max(buckets.batches(w, h))
        lh, lw = h // latent_scale, w // latent_scale
        out.append(Profile((1, hi, hi), (lh, lh, lh), (lw, lw, lw)))
    return tuple(out)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def adapter_architecture(method: str, options: SpecOptions) -> str | None:
    """A fingerprint of what a method's graph takes from its adapter: the shape of identity inputs."""
    arch = {"sca": {"n_tokens": options.n_tokens}, "ip": {"n_tokens": options.n_tokens},
            "eaa": {"cross_tokens": options.eaa_cross_tokens}}.get(method)
    return None if arch is None else _fingerprint({"method": method, **arch})


def device_name(device: torch.device) -> str:
    """The device an engine is specific to: cpu, or the GPU's name and compute capability."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def cache_record(name: str, info: Availability, kind: str, method: str, spec, options: SpecOptions, weights: str,
                 device: str) -> dict:
    """Everything an engine depends on (the engine cache's key); identities are inputs, not in it."""
    import onnx

    from pidrt.export.onnx_export import EXPORT_FORMAT

    return {"cache_format": CACHE_FORMAT, "backend": name, "kind": kind, "method": method, "dtype": spec.dtype,
            "base_weights": weights, "adapter_architecture": adapter_architecture(method, options),
            "profiles": [[list(p.batch), list(p.height), list(p.width)] for p in spec.profiles],
            "spec": _fingerprint(spec.to_json()), "device": device,
            "versions": {"torch": torch.__version__, "pidrt": __version__, "export_format": EXPORT_FORMAT,
                         "onnx": onnx.__version__, name: info.version}}


def open_graphs(name: str, pipe, encoders, methods, buckets, *, engines: Path | None, cache: EngineCache | None,
                threads: int | None, info: Availability, stage: Callable[[str], None], progress: bool
                ) -> tuple[GraphPipeline, dict]:
    """(the pipeline, a report of each graph: where it came from and what it cost)."""
    from tqdm import tqdm

    from pidrt.export.commands import ExportOptions, export_models
    from pidrt.export.wrappers import source_module
    from pidrt.identity.key import fingerprint_module

    if pipe.dtype not in (torch.float32, torch.float16):
        raise PidrtError(f"the {name} backend runs graphs exported in float32 or float16, not {pipe.dtype}; "
                         "pass --dtype float32 or float16")
    models, dtype = pipe.models, "float16" if pipe.dtype == torch.float16 else "float32"
    profiles = trt_profiles(buckets, models.preset.latent_scale) if name == "trt" else None
    device = device_name(pipe.device)
    graphs = [("text_encoder", "none"), ("vae_decoder", "none")] + [("unet", m) for m in methods]
    prints: dict[str, str] = {}
    report: dict = {}
    folders: dict[tuple, Path] = {}
    with tqdm(total=len(graphs), desc=f"{name} engines", unit="graph", disable=not progress, leave=False) as bar:
        for kind, method in graphs:
            label = f"{kind}:{method}" if kind == "unet" else kind
            clock = time.perf_counter()
            options = spec_options(encoders, method, profiles)
            if kind not in prints:
                prints[kind] = fingerprint_module(source_module(models, kind))
            if engines is not None:
                folders[kind, method] = engines
                _check_given(engines, kind, method, dtype, prints[kind])
                status = "given"
            else:
                spec = model_spec(kind, models.preset, pipe.layers, method, dtype, options)
                record = cache_record(name, info, kind, method, spec, options, prints[kind], device)

                def build(folder: Path, kind=kind, method=method, options=options, label=label) -> None:
                    stage(f"exporting {label}")
                    export_models(models, method, folder, dtype == "float16", ExportOptions(kinds=(kind,), spec=options))
                    if name == "trt":
                        stage(f"building the TensorRT engine of {label}")
                        _build_trt(find_graph(folder, kind, method, dtype), profiles)

                stage(f"checking the engine cache for {label}")
                folders[kind, method], status = cache.get_or_build(f"{name}-{spec.name}", record, build)
            report[label] = {"folder": str(folders[kind, method]), "cache": status,
                             "prepare_s": round(time.perf_counter() - clock, 3)}
            bar.update(1)

    opened: dict[tuple, object] = {}
    backend_options = {"threads": threads} if name == "ort" and threads else {}
    if name == "trt":
        from pidrt.engines.trt_backend import BuildOptions

        backend_options = {"options": BuildOptions(profiles=profiles)}
    with tqdm(total=len(graphs), desc=f"opening {name} sessions", unit="graph", disable=not progress,
              leave=False) as bar:
        for kind, method in graphs:
            label = f"{kind}:{method}" if kind == "unet" else kind
            stage(f"opening {label}")
            clock = time.perf_counter()
            entry = find_graph(folders[kind, method], kind, method, dtype)
            opened[kind, method] = open_graph(entry, name, models, **backend_options)
            report[label]["open_s"] = round(time.perf_counter() - clock, 3)
            bar.update(1)
    runners = Runners(text_encoder=TextRunner(opened["text_encoder", "none"]),
                      vae_decoder=VAEDecoderRunner(opened["vae_decoder", "none"]))
    unets = {method: UNetRunner(opened["unet", method]) for method in methods}
    return GraphPipeline(models, unets, runners, pipe.device, pipe.dtype, name), report


def _check_given(folder: Path, kind: str, method: str, dtype: str, weights: str) -> None:
    """A graph of a user's export folder: present, whole, and exported from these weights."""
    what = f"{kind} ({method})" if kind == "unet" else kind
    try:
        entry: GraphEntry = find_graph(folder, kind, method, dtype)
    except PidrtError as exc:
        raise PidrtError(f"{exc}. Export it: pidrt export --method {method} --out {folder}"
                         + (" --fp16" if dtype == "float16" else "")) from None
    if not entry.files_present():
        raise PidrtError(f"{entry.path}: the {what} graph's files are missing or truncated; export it again")
    if entry.weights != weights:
        raise PidrtError(f"{folder}: the {what} graph was exported from other weights than this server's models; "
                         "export again from the same --model / --preset / --seed")


def _build_trt(entry: GraphEntry, profiles) -> None:
    from pidrt.engines.trt_backend import BuildOptions, build_engine

    build_engine(entry, BuildOptions(profiles=profiles))
