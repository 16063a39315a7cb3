"""Typed runners on top of `GraphRunner`: what the pipeline calls, whatever the backend.

`open_runners(export_dir, backend, method)` opens the graphs of an export folder (its manifest)
on one backend and returns `Runners`, whose members take and return the pipeline's own tensors:
token ids, latents, images, and for the UNet either named identity inputs or the payloads of a
`BranchState` (converted by `pidrt.export.inputs.unet_feed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pidrt.engines.base import Backend, GraphRunner, backend_module, require_backend
from pidrt.errors import PidrtError
from pidrt.export.inputs import TORCH_DTYPES, unet_feed
from pidrt.export.manifest import GraphEntry, graph_entries
from pidrt.export.retouch_io import read_maps
from pidrt.models.attention import Payload


def open_graph(entry: GraphEntry, backend: Backend | str, models=None, **options) -> GraphRunner:
    """A runner for one manifest entry on `backend` (options are the backend's: threads, providers...)."""
    info = require_backend(backend)
    return backend_module(info.backend).open_runner(entry, models, **options)


class UNetRunner:
    def __init__(self, graph: GraphRunner):
        self.graph, self.spec = graph, graph.spec

    @property
    def method(self) -> str:
        return self.spec.method

    def __call__(self, sample: torch.Tensor, timestep, ctx: torch.Tensor, scale: torch.Tensor | None = None,
                 identity: Mapping[str, torch.Tensor] | None = None,
                 payloads: Mapping[str, Payload] | None = None, value_context: torch.Tensor | None = None,
                 swap: Mapping | None = None, maps=None) -> torch.Tensor:
        """noise prediction; identity: named inputs (a_<i>, b_<i>, bias_<i> / k_<i>, v_<i>) or payloads.

        value_context: cross-attention's V context when it is not ctx (token identities); swap,
        maps: retouch edits and the subject-map recorder (a retouch graph fills its maps).
        """
        feed = unet_feed(self.spec, sample, timestep, ctx, scale, payloads, value_context, swap, maps)
        if identity:
            for name, t in identity.items():
                feed[name] = t.to(feed["sample"].device, TORCH_DTYPES[self.spec.input(name).dtype])
        out = self.graph.run(feed)
        if self.spec.retouch_layers:
            read_maps(self.spec, maps, out["subject_maps"].to(sample.dtype))
        return out["noise_pred"].to(sample.dtype)


class TextRunner:
    def __init__(self, graph: GraphRunner):
        self.graph, self.spec = graph, graph.spec

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.graph.run({"input_ids": input_ids.to(torch.int32)})["last_hidden_state"]


class VAEDecoderRunner:
    def __init__(self, graph: GraphRunner):
        self.graph, self.spec = graph, graph.spec

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """UNet-scale latents -> images in [0, 1] (float32, as Pipeline.decode)."""
        return self.graph.run({"latent": latent.to(TORCH_DTYPES[self.spec.dtype])})["images"].float()


class VAEEncoderRunner:
    def __init__(self, graph: GraphRunner):
        self.graph, self.spec = graph, graph.spec

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph.run({"images": images.to(TORCH_DTYPES[self.spec.dtype])})["latent"]


@dataclass
class Runners:
    unet: UNetRunner | None = None
    text_encoder: TextRunner | None = None
    vae_decoder: VAEDecoderRunner | None = None
    vae_encoder: VAEEncoderRunner | None = None


_TYPED = {"unet": UNetRunner, "text_encoder": TextRunner, "vae_decoder": VAEDecoderRunner,
          "vae_encoder": VAEEncoderRunner}


def open_runners(export_dir: Path | str, backend: Backend | str = Backend.ORT, method: str = "none",
                 dtype: str | None = None, models=None, retouch: bool | None = None, **options) -> Runners:
    """The graphs of `export_dir` for one UNet method (and dtype, if both were exported) on `backend`.

    retouch: take the UNet with (True) or without (False) retouch inputs; None: whichever is there.
    """
    runners = Runners()
    for entry in graph_entries(export_dir).values():
        spec = entry.spec
        if (spec.kind == "unet" and spec.method != method) or (dtype and spec.dtype != dtype):
            continue
        if spec.kind == "unet" and retouch is not None and bool(spec.retouch_layers) != retouch:
            continue
        if getattr(runners, spec.kind) is not None:
            raise PidrtError(f"{export_dir}: several {spec.kind} graphs match; pass dtype (and retouch)")
        setattr(runners, spec.kind, _TYPED[spec.kind](open_graph(entry, backend, models, **options)))
    return runners
