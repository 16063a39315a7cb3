"""Start-up warm-up: one short generation per declared bucket and loaded method.

What a first call costs differs per backend (the fast backend captures a CUDA graph per
(batch, resolution, identity structure), TensorRT selects and initialises a profile, onnxruntime
allocates and plans its first run of a shape), but running the shape once pays it on every
backend, before the server says it is ready. A bucket's identity data is zeros of the graph's
shapes: a graph (and a captured CUDA graph) depends on the structure of identity inputs, never
their values, so a warmed bucket serves every identity of its method.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from pidrt.engines.options import Bucket, Buckets
from pidrt.export.specs import ModelSpec, axis_env, resolve
from pidrt.export.wrappers import QUERY
from pidrt.models.folded import FoldedBranch
from pidrt.models.conditions import EAACondition, FoldedCondition, ScaleSchedule
from pidrt.runtime.pipeline import ImageSpec, SamplingConfig

WARMUP_GUIDANCE = 7.5  # CFG on: the UNet batch is twice the bucket's, as in a served request


def _zeros(spec: ModelSpec, name: str, env: dict[str, int]) -> torch.Tensor:
    """One element's tensor of a graph input (its leading batch axis dropped)."""
    return torch.zeros(tuple(resolve(d, env) for d in spec.input(name).dims)[1:])


def synthetic_condition(spec: ModelSpec, width: int, height: int, steps: int, latent_scale: int):
    """Zero identity data with the shapes `spec`'s method takes at this resolution (None for none)."""
    if spec.method == "none":
        return None
    env = axis_env(1, height // latent_scale, width // latent_scale, spec.levels)
    if spec.method in QUERY:
        branches = {}
        for index, name in spec.identity_layers:
            a = _zeros(spec, f"a_{index}", env)[None]
            branches[name] = FoldedBranch(a, _zeros(spec, f"b_{index}", env)[None], torch.zeros(1, a.shape[-1]),
                                          _zeros(spec, f"bias_{index}", env)[None], spec.n_tokens)
        return FoldedCondition(spec.method, QUERY[spec.method], branches, branches)
    kv = {name: (_zeros(spec, f"k_{index}", env), _zeros(spec, f"v_{index}", env))
          for index, name in spec.identity_layers}
    return EAACondition(steps=[kv] * steps)


def warm_up(pipe, buckets: Buckets, specs: dict[str, ModelSpec], on_stage: Callable[[str], None] | None = None,
            progress: bool = True) -> dict[str, float]:
    """Run every bucket x method once (one DDIM step, CFG on); {"<method> <bucket>": seconds}."""
    from tqdm import tqdm

    scale = pipe.models.preset.latent_scale
    work = [(method, b) for b in buckets.buckets for method in specs]
    seconds: dict[str, float] = {}
    with tqdm(total=len(work), desc="warming buckets", unit="bucket", disable=not progress, leave=False) as bar:
        for method, bucket in work:
            label = f"{method} {bucket}"
            if on_stage is not None:
                on_stage(f"warming {label} ({len(seconds) + 1}/{len(work)})")
            clock = time.perf_counter()
            run_bucket(pipe, bucket, synthetic_condition(specs[method], bucket.width, bucket.height, 1, scale))
            seconds[label] = round(time.perf_counter() - clock, 4)
            bar.update(1)
    return seconds


def run_bucket(pipe, bucket: Bucket, condition) -> None:
    config = SamplingConfig(steps=1, guidance=WARMUP_GUIDANCE, height=bucket.height, width=bucket.width)
    schedule = ScaleSchedule(1.0 if condition is not None else 0.0)
    pipe.generate(config, [ImageSpec("", seed=i, condition=condition, schedule=schedule) for i in range(bucket.batch)])
