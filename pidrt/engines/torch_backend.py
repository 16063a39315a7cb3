"""The `torch` backend: the export wrappers run eagerly. The reference every other backend matches.

It runs the same `UNetGraph` / VAE / text wrappers the exporter traces, with SDPA attention (what
the pipeline runs) instead of the explicit MatMul-Softmax-MatMul form the graphs carry, so a
mismatch with `ort` or `trt` isolates the export and the engine, not the model code.
"""

from __future__ import annotations

import copy

import torch

from pidrt.engines.base import Availability, Backend, GraphRunner, torch_devices
from pidrt.export.inputs import TORCH_DTYPES
from pidrt.export.manifest import GraphEntry, models_from_source
from pidrt.export.specs import ModelSpec
from pidrt.export.wrappers import graph_module


def probe() -> Availability:
    return Availability(Backend.TORCH, True, version=torch.__version__, devices=torch_devices())


class TorchRunner(GraphRunner):
    backend = Backend.TORCH

    def __init__(self, spec: ModelSpec, module: torch.nn.Module):
        super().__init__(spec)
        self.module = module

    @torch.no_grad()
    def _run(self, feed, env):
        out = self.module(*(feed[n] for n in self.spec.input_names))
        return dict(zip(self.spec.output_names, out if isinstance(out, tuple) else (out,)))


def module_for(models, spec: ModelSpec, explicit_attention: bool = False) -> torch.nn.Module:
    """The wrapper for `spec`, on a copy of the weights cast to the graph dtype if they differ."""
    module = graph_module(models, spec, explicit_attention)
    dtype = TORCH_DTYPES[spec.dtype]
    if any(p.dtype != dtype for p in module.parameters()):
        module = copy.deepcopy(module).to(dtype)
    return module


def open_runner(entry: GraphEntry, models=None, device: str | torch.device | None = None,
                explicit_attention: bool = False) -> TorchRunner:
    models = models if models is not None else models_from_source(entry.source)
    module = module_for(models, entry.spec, explicit_attention)
    if device is not None:
        module = module.to(device)
    return TorchRunner(entry.spec, module)
