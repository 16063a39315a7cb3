"""The functions behind `pidrt export`, `pidrt verify` and `pidrt build` (the CLI wires argparse).

export_models: graphs + manifest.json into a folder, skipping graphs whose cached key matches.
verify: each graph on a backend against the torch reference, on random identities.
build: TensorRT engines for every graph of a folder (a clear error without TensorRT).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pidrt import __version__
from pidrt.errors import PidrtError
from pidrt.export import retouch_io
from pidrt.export.inputs import TORCH_DTYPES, example_feed, random_identity_batch, random_retouch_edits, unet_feed
from pidrt.export.manifest import FORMAT, GraphEntry, graph_entries, models_from_source, read_manifest, write_manifest
from pidrt.export.onnx_export import export_graph, graph_key
from pidrt.export.specs import KINDS, ModelSpec, SpecOptions, model_spec
from pidrt.export.wrappers import graph_module, source_module
from pidrt.identity.key import fingerprint_module
from pidrt.models.attention import attention_layers, branch_state
from pidrt.models.build import Models, build_random
from pidrt.models.presets import Preset, get_preset


@dataclass(frozen=True)
class ExportOptions:
    kinds: tuple[str, ...] = KINDS
    seed: int = 0  # weights seed when a preset name is given (random weights)
    spec: SpecOptions = SpecOptions()  # noqa: RUF009 (frozen, so sharing the default is safe)
    force: bool = False  # re-export even when the cached graph matches


def _models(preset_or_models: str | Preset | Models, seed: int) -> Models:
    if isinstance(preset_or_models, Models):
        return preset_or_models
    preset = get_preset(preset_or_models) if isinstance(preset_or_models, str) else preset_or_models
    return build_random(preset, seed)


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # A copy, never an in-place cast: fp16 export must not change the caller's fp32 models.
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(dtype)


def export_models(preset_or_models: str | Preset | Models, method: str = "none", out_dir: Path | str = "export",
                  fp16: bool = False, options: ExportOptions = ExportOptions()) -> Path:
    """Export text encoder, UNet (of `method`), VAE decoder and encoder; returns manifest.json's path.

    The exporter's dependencies are checked before the folder is made, and a folder this call
    made is removed again if the export fails before writing anything into it."""
    from pidrt.errors import require

    require("onnx", "onnx")
    require("onnx_graphsurgeon", "onnx")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PidrtError(f"export folder {out} is a file, not a folder")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PidrtError(f"cannot create the export folder {out}: {exc.strerror or exc}") from None
    try:
        return _export_into(out, preset_or_models, method, fp16, options)
    except BaseException:
        if made and not any(out.iterdir()):
            out.rmdir()
        raise


def _export_into(out: Path, preset_or_models, method: str, fp16: bool, options: ExportOptions) -> Path:
    models = _models(preset_or_models, options.seed)
    dtype = "float16" if fp16 else "float32"
    layers = attention_layers(models.unet)
    manifest = read_manifest(out, missing_ok=True)
    manifest.update(format=FORMAT, pidrt=__version__)
    source = {"preset": models.preset.name, "models": models.name}
    cast: dict[str, torch.nn.Module] = {}
    for kind in options.kinds:
        spec = model_spec(kind, models.preset, layers, method if kind == "unet" else "none", dtype, options.spec)
        weights = fingerprint_module(source_module(models, kind))
        key = graph_key(weights, spec)
        old = manifest["graphs"].get(spec.name)
        if old and not options.force and old.get("key") == key and GraphEntry.from_json(out, spec.name, old).files_present():
            continue
        attr = "unet" if kind == "unet" else "text_encoder" if kind == "text_encoder" else "vae"
        if attr not in cast:
            cast[attr] = _in_dtype(getattr(models, attr), TORCH_DTYPES[dtype])
        typed = Models(models.preset, cast.get("unet", models.unet), cast.get("text_encoder", models.text_encoder),
                       cast.get("vae", models.vae), models.tokenizer, models.name)
        result = export_graph(graph_module(typed, spec), spec, out / f"{spec.name}.onnx", key)
        manifest["graphs"][spec.name] = {
            "file": result.path.name, "data": result.data_path.name if result.data_path else None,
            "key": key, "weights": weights, "bytes": result.bytes, "spec": spec.to_json(), "source": source,
            "opset": spec.opset, "dtype": dtype, "inputs": spec.input_names, "outputs": spec.output_names,
            "ops": list(result.ops), "trt_problems": list(result.trt_problems),
            "export_seconds": round(result.seconds, 2), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_manifest(out, manifest)  # after each graph: an interrupted export keeps what is done
        # Data files of earlier exports of this graph: unreferenced now that the manifest moved on.
        for stale in out.glob(f"{spec.name}.*.onnx.data"):
            if stale.name != manifest["graphs"][spec.name]["data"]:
                stale.unlink(missing_ok=True)
    return write_manifest(out, manifest)


@dataclass(frozen=True)
class VerifyOptions:
    graphs: tuple[str, ...] | None = None  # graph names; None: all in the manifest
    sizes: tuple[tuple[int, int], ...] | None = None  # latent (h, w); None: each profile's min and max
    seed: int = 0
    backend_options: dict = field(default_factory=dict, hash=False)  # e.g. {"threads": 1}


def reference_output(models: Models, spec: ModelSpec, feed: dict, payloads=None, scale=None) -> torch.Tensor:
    """The torch pipeline's own result for a feed, in fp32 (UNet: through BranchState payloads)."""
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in feed.items()}
    with torch.no_grad():
        if spec.kind != "unet":
            module = graph_module(models, spec, explicit_attention=False)
            return module(*(f32[n] for n in spec.input_names)).float()
        state = branch_state(models.unet)
        state.layers, state.scale = (payloads or {}), scale
        state.value_context = f32.get("value_context")
        if spec.retouch_layers:  # the retouch edits the feed describes (indices, slots, masks)
            state.swap, state.maps = retouch_io.graph_payloads(spec, f32)
        try:
            return models.unet(f32["sample"], f32["timestep"], encoder_hidden_states=f32["encoder_hidden_states"]).sample
        finally:
            state.clear()


def _feed_for(models: Models, spec: ModelSpec, h: int, w: int, seed: int):
    if spec.kind != "unet":
        return example_feed(spec, 3, h, w, seed), None, None
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(3, spec.input("sample").dims[1], h, w, generator=g)
    ctx = torch.randn(3, *spec.input("encoder_hidden_states").dims[1:], generator=g)
    # Element 1 reads another V context (a token identity); 0 and 2 read ctx for both, as prompts do.
    value_context = ctx.clone()
    value_context[1] = torch.randn(ctx.shape[1:], generator=g)
    payloads, scale = random_identity_batch(models.unet, spec, h, w, seed)
    swap, maps = random_retouch_edits(spec, 3, h, w, seed) if spec.retouch_layers else (None, None)
    feed = unet_feed(spec, sample, torch.tensor([999.0, 500.0, 20.0]), ctx, scale, payloads,
                     value_context if "value_context" in spec.input_names else None, swap, maps)
    return feed, payloads, scale


def verify(export_dir: Path | str, backend: str = "ort", options: VerifyOptions = VerifyOptions(),
           models: Models | None = None) -> dict:
    """{graph: {"max_abs", "max_rel", "sizes"}} of `backend` against the torch reference.

    UNet batches are [identity 1, identity 2, no identity with scale 0]; max_rel is max_abs over
    the reference's max magnitude. fp16 graphs are compared with the fp32 reference.
    """
    from pidrt.engines.runners import open_graph

    entries = graph_entries(export_dir)
    names = options.graphs or tuple(sorted(entries))
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise PidrtError(f"{export_dir}: no graphs {unknown}; have {sorted(entries)}")
    report: dict = {}
    prints: dict[int, str] = {}
    for name in names:
        entry = entries[name]
        if models is None:
            models = models_from_source(entry.source)
        module = source_module(models, entry.spec.kind)
        if prints.setdefault(id(module), fingerprint_module(module)) != entry.weights:
            raise PidrtError(f"{name}: the reference models are not the ones the graph was exported from")
        runner = open_graph(entry, backend, models, **options.backend_options)
        sizes = options.sizes or sorted({(p.height[i], p.width[i]) for p in entry.spec.profiles for i in (0, 2)})
        worst_abs = worst_rel = 0.0
        for h, w in sizes:
            feed, payloads, scale = _feed_for(models, entry.spec, h, w, options.seed)
            ref = reference_output(models, entry.spec, feed, payloads, scale)
            got = runner.run(feed)[entry.spec.output_names[0]].float().cpu()
            err = (got - ref).abs().max().item()
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / max(ref.abs().max().item(), 1e-12))
        runner.close()
        report[name] = {"max_abs": worst_abs, "max_rel": worst_rel, "sizes": [list(s) for s in sizes],
                        "dtype": entry.spec.dtype}
    return {"backend": backend, "graphs": report}


def build(export_dir: Path | str, backend: str = "trt", options=None) -> list[Path]:
    """Build (or find cached) TensorRT engines for every graph; returns their paths."""
    from pidrt.engines.base import Backend, require_backend

    if Backend.parse(backend) is not Backend.TRT:
        raise PidrtError(f"nothing to build for backend {backend!r}: only 'trt' compiles engines ahead of time "
                         "(onnxruntime builds its sessions when they are opened)")
    require_backend(Backend.TRT)
    from pidrt.engines.trt_backend import BuildOptions, build_engine

    options = options or BuildOptions()
    return [build_engine(entry, options) for entry in graph_entries(export_dir).values()]
