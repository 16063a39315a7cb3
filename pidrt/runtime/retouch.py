"""Layout-and-Retouch at Pipeline level: stage 1 (the layout) and stage 2 (the retouch).

Stage 1 is a generation whose identity branch is off for the first k steps (the identity's
`ScaleSchedule` with start = k); its result is the layout image. Stage 2 denoises three paths
in one loop (papers/layout-and-retouch.txt sec. 3.2.2, docs/retouch.md):

- the layout path. `layout="inversion"` (the paper's, default): the layout image is VAE-encoded,
  DDIM-inverted with the prompt at guidance 1, and denoised again as a row of every stage-2
  call. `layout="recorded"`: stage 1 records the K/V and outputs of the edited layers while it
  runs, so the layout path costs no inversion and no row.
- the reference path: the identity's reference image's DDIM trajectory, what EAA enrollment
  records (`reference_path`). `reference="cached"`: per step, the K/V of the edited layers,
  projected through the UNet's own to_k / to_v (no row); `reference="rows"`: P_T denoised with
  the caption as a row of every call.
- the target path, which is returned: rows started from the layout path's x_T, identity branch
  on (the image's schedule), K/V swapped and outputs blended per `RetouchConfig`.

Every variant counts its UNet calls and the rows they evaluate (`RetouchOutput.unet_calls`,
`.unet_rows`): the paper's form costs stage 1 + the layout inversion + three paths, the cached
one stage 1 + the target path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.models.adapters import layer_level
from pidrt.models.retouch import LayerTap, RetouchConfig, SubjectMaps, map_layers, swap_layers, token_weights
from pidrt.models.retouch_mask import blend_masks, level_masks
from pidrt.runtime.eaa_feed import make_feed
from pidrt.runtime.inversion import Inversion, ddim_invert, invert_and_record
from pidrt.runtime.pipeline import ImageSpec, Pipeline, SamplingConfig, initial_noise
from pidrt.runtime.retouch_plan import PathSource, RowPlan
from pidrt.runtime.schedulers import DDIM

StepKV = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ReferencePath:
    """The identity's reference image trajectory (from `reference_path`).

    kv: per sampling step, edited layer name -> (K, V) [N, C] (the cached form).
    latent_t, caption: P_T [1, 4, h, w] and the caption it was inverted with (the rows form).
    """

    caption: str
    latent_t: torch.Tensor | None = None
    kv: list[StepKV] | None = None


@dataclass(frozen=True)
class RetouchOptions:
    """How the runtime serves the two guide paths (both give the method; they differ in cost)."""

    layout: Literal["inversion", "recorded"] = "inversion"
    reference: Literal["cached", "rows"] = "cached"


@dataclass
class RetouchSpec:
    """One image: its ImageSpec (prompt, seed, identity, the target's schedule), its reference,
    the subject's token positions in the prompt (the mask's maps) and an optional binary
    foreground mask [H, W] of the layout image (the paper's Segment-Anything mask)."""

    image: ImageSpec
    reference: ReferencePath
    subject_tokens: tuple[int, ...]
    user_mask: torch.Tensor | None = None


@dataclass
class RetouchOutput:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]: the targets
    latents: torch.Tensor
    layout_images: torch.Tensor
    timings: dict[str, float]
    unet_calls: dict[str, int] = field(default_factory=dict)  # per part: UNet invocations
    unet_rows: dict[str, int] = field(default_factory=dict)  # per part: rows evaluated (sum of batch sizes)


def reference_path(pipe: Pipeline, image_latents: torch.Tensor, caption: str, steps: int, layer_names: Sequence[str],
                   inversion: Inversion | None = None) -> ReferencePath:
    """Invert a reference image's latent [1, 4, h, w] (or take EAA enrollment's `inversion` of it)
    and project the recorded attn1 inputs of `layer_names` through the UNet's own to_k / to_v."""
    inversion = inversion or invert_and_record(pipe, image_latents, caption, steps)
    if len(inversion.features) != steps:
        raise PidrtError(f"the reference was recorded for {len(inversion.features)} steps, not {steps}")
    modules = dict(pipe.models.unet.named_modules())
    kv = []
    with torch.no_grad():
        for step in inversion.features:
            kv.append({n: (modules[n].to_k(step[n][0]), modules[n].to_v(step[n][0])) for n in layer_names})
    return ReferencePath(caption, inversion.latent_t[:1], kv)


@contextlib.contextmanager
def _counting(pipe: Pipeline, calls: dict[str, int], rows: dict[str, int], part: str):
    """Count the UNet calls (and their rows) made in a block, whichever backend serves them."""
    inner = pipe.unet
    calls.setdefault(part, 0)
    rows.setdefault(part, 0)

    def unet(x, t, ctx):
        calls[part] += 1
        rows[part] += x.shape[0]
        return inner(x, t, ctx)

    pipe.unet = unet
    try:
        yield
    finally:
        del pipe.unet


def retouch(pipe: Pipeline, sampling: SamplingConfig, specs: Sequence[RetouchSpec],
            config: RetouchConfig = RetouchConfig(), options: RetouchOptions = RetouchOptions(),
            on_step: Callable[[int, int], None] | None = None) -> RetouchOutput:
    """Stage 1 then stage 2 for `specs` (one batch: they share steps, size and guidance).

    on_step(i, total) after each of the loops' steps (stage 1, the layout inversion, stage 2:
    2T or 3T in all), for progress and cancellation by raising, as in `Pipeline.generate`."""
    if not specs:
        raise PidrtError("nothing to retouch: no images requested")
    if sampling.scheduler != "ddim":
        raise PidrtError(f"the retouch follows DDIM trajectories (inversion, the reference path); "
                         f"use scheduler 'ddim', not {sampling.scheduler!r}")
    sampling.check(pipe.models.preset.latent_scale)
    config.check(sampling.steps)
    if options.layout not in ("inversion", "recorded") or options.reference not in ("cached", "rows"):
        raise PidrtError(f"unknown retouch options {options}")
    edited = swap_layers(pipe.layers, config)
    names = [layer.name for layer in edited]
    _check_specs(specs, options, sampling, names)
    timings: dict[str, float] = {}
    calls: dict[str, int] = {}
    rows: dict[str, int] = {}

    clock = time.perf_counter()
    stage1 = [dataclasses.replace(s.image, schedule=dataclasses.replace(s.image.schedule, start=config.layout_steps))
              for s in specs]
    taps = {n: LayerTap() for n in names} if options.layout == "recorded" else {}
    steps = sampling.steps
    total = steps * (3 if options.layout == "inversion" else 2)
    done = iter(range(total))
    progress = (lambda *_: on_step(next(done), total)) if on_step is not None else None
    with _counting(pipe, calls, rows, "stage1"):
        pipe.state.swap = taps  # kept for every call of the generation; its end clears it
        layout = pipe.generate(sampling, stage1, on_step=progress)
    timings["stage1_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    prompts = [s.image.prompt for s in specs]
    if options.layout == "inversion":
        with _counting(pipe, calls, rows, "layout_inversion"):
            x_t = ddim_invert(pipe, pipe.encode_image(layout.images), prompts, steps, progress)
    else:
        x_t = initial_noise([s.image.seed for s in specs], tuple(layout.latents.shape[1:]), pipe.dtype, pipe.device)
    timings["layout_path_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    with _counting(pipe, calls, rows, "stage2"):
        latents, mask_s = _stage2(pipe, sampling, specs, config, options, edited, x_t, taps, progress)
    timings["stage2_s"] = time.perf_counter() - clock
    timings["mask_s"] = mask_s
    clock = time.perf_counter()
    images = pipe.decode(latents)
    timings["vae_decode_s"] = time.perf_counter() - clock
    return RetouchOutput(images, latents, layout.images, timings, calls, rows)


def _check_specs(specs, options: RetouchOptions, sampling: SamplingConfig, names: list[str]) -> None:
    steps = sampling.steps
    for i, s in enumerate(specs):
        mask = s.user_mask
        if mask is not None and tuple(mask.shape) != (sampling.height, sampling.width):
            raise PidrtError(f"image {i}: the foreground mask must be {sampling.height}x{sampling.width} (the image); "
                             f"got {tuple(mask.shape)}")
        if mask is not None and bool(((mask != 0) & (mask != 1)).any()):
            raise PidrtError(f"image {i}: the foreground mask must be binary (0 and 1)")
        ref = s.reference
        if options.reference == "rows" and ref.latent_t is None:
            raise PidrtError(f"image {i}: the reference path as rows needs the reference's P_T latent")
        if options.reference == "cached":
            if ref.kv is None or len(ref.kv) != steps:
                got = "none" if ref.kv is None else f"{len(ref.kv)} steps"
                raise PidrtError(f"image {i}: the cached reference path needs K/V for each of the {steps} steps; "
                                 f"it has {got}")
            missing = [n for n in names if n not in ref.kv[0]]
            if missing:
                raise PidrtError(f"image {i}: the cached reference path lacks the edited layers {missing[:2]}; "
                                 "record it for these layers")
        if not s.subject_tokens:
            raise PidrtError(f"image {i}: the blend mask needs the subject's token positions")


def _stage2(pipe: Pipeline, sampling: SamplingConfig, specs, config: RetouchConfig, options: RetouchOptions,
            edited, x_t: torch.Tensor, taps: dict[str, LayerTap], progress) -> tuple[torch.Tensor, float]:
    n, steps = len(specs), sampling.steps
    cfg = sampling.guidance != 1.0
    halves = 2 if cfg else 1
    ctx_parts, x_paths = [], []
    layout_rows = reference_rows = None
    if options.layout == "inversion":
        layout_rows = list(range(n))
        x_paths.append(x_t)
        ctx_parts.append(pipe.encode_text([s.image.prompt for s in specs]))
    if options.reference == "rows":
        start = len(x_paths) * n
        reference_rows = list(range(start, start + n))
        x_paths.append(torch.cat([s.reference.latent_t for s in specs]).to(pipe.device, pipe.dtype))
        ctx_parts.append(pipe.encode_text([s.reference.caption for s in specs]))
    path_rows = len(x_paths) * n
    conditions = [None] * path_rows + [s.image.condition for s in specs] * halves
    half_names = ["cond"] * path_rows + (["uncond"] * n if cfg else []) + ["cond"] * n
    ctx_parts.append(pipe.encode_text(([s.image.negative_prompt for s in specs] if cfg else []) +
                                      [s.image.prompt for s in specs]))
    fixed = pipe._few_token_payloads(conditions, half_names, sampling.folded)
    feed = make_feed(pipe, conditions, steps, sampling.eaa_placement, sampling.scheduler)
    front = feed.rows if feed is not None else 0
    ctx = torch.cat(([feed.ctx] if front else []) + ctx_parts)
    batch = front + path_rows + halves * n
    targets = [[front + path_rows + k * n + j for k in range(halves)] for j in range(n)]
    schedules = [s.image.schedule for s in specs] * halves
    scales = torch.tensor([[0.0] * (front + path_rows) + [sch.at(i) if c is not None else 0.0
                                                           for sch, c in zip(schedules, conditions[path_rows:])]
                           for i in range(steps)], device=pipe.device, dtype=pipe.dtype)
    plan = RowPlan(batch, targets, _layout_source(layout_rows, taps, front, n, halves),
                   _reference_source(reference_rows, specs, front, halves), config,
                   {layer.name: _tokens(pipe, layer, x_t) for layer in edited})
    n_levels = len(pipe.models.unet.config.block_out_channels)
    mapped = map_layers(pipe.layers, config.mask, n_levels)
    weights = torch.zeros(batch, ctx.shape[1], device=pipe.device, dtype=pipe.dtype)
    weights[[rows[-1] for rows in targets]] = token_weights([s.subject_tokens for s in specs], ctx.shape[1],
                                                            pipe.dtype, pipe.device)
    sides = {_tokens(pipe, layer, x_t): _side(x_t, layer_level(layer.name, n_levels)) for layer in edited}
    map_side = _side(x_t, config.mask.map_level)
    sched = DDIM(pipe.models.preset.scheduler, steps)
    x_targets, x_rows = x_t, (torch.cat(x_paths) if x_paths else None)
    masks, mask_seconds = None, 0.0
    state = pipe.state
    try:
        for i, t in enumerate(sched.timesteps):
            state.layers = fixed if feed is None else feed.payloads(i)
            state.scale = scales[i]
            state.swap = plan.swap(i, masks, pipe.device)
            record_maps = config.blend_from - 1 <= i < steps - 1
            state.maps = SubjectMaps(weights, frozenset(layer.name for layer in mapped)) if record_maps else None
            parts = ([feed.x] if front else []) + ([x_rows] if x_rows is not None else []) + [x_targets] * halves
            eps = pipe.unet(torch.cat(parts), t, ctx)
            if front:
                feed.advance(eps[:front], i)
            if x_rows is not None:
                x_rows = sched.step(eps[front:front + path_rows], i, x_rows)
            eps_t = eps[front + path_rows:]
            if cfg:
                eps_u, eps_c = eps_t.chunk(2)
                eps_t = eps_u + sampling.guidance * (eps_c - eps_u)
            x_targets = sched.step(eps_t, i, x_targets)
            if record_maps:
                clock = time.perf_counter()
                maps = state.maps.mean([layer.name for layer in mapped])[[rows[-1] for rows in targets]]
                per_image = blend_masks(maps, map_side, tuple(x_t.shape[-2:]), config.mask,
                                        [s.user_mask for s in specs])
                masks = _batch_masks(level_masks(per_image, sides), targets, batch, pipe)
                mask_seconds += time.perf_counter() - clock
            if progress is not None:
                progress()
    finally:
        state.clear()
    return x_targets, mask_seconds


def _side(x: torch.Tensor, level: int) -> tuple[int, int]:
    """The token grid at `level` halvings of the latent (stride-2 convolutions round up)."""
    f = 2 ** level
    return (math.ceil(x.shape[-2] / f), math.ceil(x.shape[-1] / f))


def _tokens(pipe: Pipeline, layer, x: torch.Tensor) -> int:
    h, w = _side(x, layer_level(layer.name, len(pipe.models.unet.config.block_out_channels)))
    return h * w


def _batch_masks(per_level: dict[int, torch.Tensor], targets, batch: int, pipe) -> dict[int, torch.Tensor]:
    """Each image's mask on its target rows, ones (own output) on every other row."""
    out = {}
    for tokens, m in per_level.items():
        full = torch.ones(batch, tokens, device=pipe.device, dtype=pipe.dtype)
        for image, rows in enumerate(targets):
            full[rows] = m[image].to(pipe.device, pipe.dtype)
        out[tokens] = full
    return out


def _layout_source(rows, taps: dict[str, LayerTap], front: int, n: int, halves: int) -> PathSource:
    if rows is not None:
        return PathSource(rows=[front + r for r in rows])
    # Stage 1's batch is [EAA reference rows, if any; negative halves; prompt halves]: target half
    # k of image j reads stage-1 row front1 + k*n + j.
    first = next(iter(taps.values()))
    front1 = first.kv[0][0].shape[0] - halves * n
    return PathSource(kv=lambda i: {name: tap.kv[i] for name, tap in taps.items()},
                      outputs=lambda i: {name: tap.outputs[i] for name, tap in taps.items()},
                      entries=[[front1 + k * n + j for k in range(halves)] for j in range(n)])


def _reference_source(rows, specs, front: int, halves: int) -> PathSource:
    if rows is not None:
        return PathSource(rows=[front + r for r in rows])

    def kv(i):
        names = specs[0].reference.kv[i].keys()
        return {name: tuple(torch.stack([s.reference.kv[i][name][p] for s in specs]) for p in (0, 1))
                for name in names}

    return PathSource(kv=kv, entries=[[j] * halves for j in range(len(specs))])
