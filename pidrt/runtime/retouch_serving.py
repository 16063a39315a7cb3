"""The Generator's side of mode "retouch": each job's cached reference path, the batch, its extras.

At submission (`RetouchServing.prepare`) a retouch request gets its identity's reference path
from the store's cache (`pidrt.identity.retouch_reference`: verified, recorded for the request's
steps and size and the plan's layers, else a 400 naming the fix) and its subject's token
positions. Batches hold retouch requests of one plan only (`ResolvedRetouch.plan_key` is part of
the batch key); `run` gives them to `pidrt.runtime.retouch.retouch` with progress over all its
loops. `image_extras` adds per image the layout image (when asked) and the UNet calls its batch
made, per part (`stage1`, `layout_inversion`, `stage2`, `total`): every image of the batch takes
part in every call.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pidrt.models.retouch import swap_layers
from pidrt.runtime.encoding import encode_image
from pidrt.runtime.retouch import ReferencePath, RetouchOutput, RetouchSpec, retouch
from pidrt.runtime.retouch_requests import subject_positions


@dataclass
class RetouchWork:
    """What a retouch job carries from submission to its batch."""

    reference: ReferencePath
    tokens: tuple[int, ...]


class RetouchServing:
    """One per Generator; keeps the last few loaded reference paths (`cache_size`) in memory:
    a reference is T x the edited layers' K/V, read and hashed once, not per request."""

    def __init__(self, pipe, store, cache_size: int = 4):
        self.pipe, self.store, self.cache_size = pipe, store, cache_size
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self, r) -> RetouchWork | None:
        """None for a plain request; InvalidRequest when the retouch cannot run for this identity."""
        from pidrt.identity.retouch_reference import ReferenceUnavailable
        from pidrt.runtime.requests import InvalidRequest

        if r.retouch is None:
            return None
        if self.store is None:
            raise InvalidRequest("mode 'retouch' needs an identity store (the cached reference paths live there)")
        try:
            cached = self._load(r.identity)
        except ReferenceUnavailable as exc:
            raise InvalidRequest(str(exc)) from None
        if cached.steps != r.steps or (r.width, r.height) != (cached.resolution, cached.resolution):
            raise InvalidRequest(f"the retouch reference of {r.identity} was recorded for {cached.steps} steps at "
                                 f"{cached.resolution}x{cached.resolution}; this request runs {r.steps} steps at "
                                 f"{r.width}x{r.height}. Ask for those, or enroll again with retouch=True and "
                                 "these steps and resolution")
        names = [layer.name for layer in swap_layers(self.pipe.layers, r.retouch.config)]
        missing = [n for n in names if n not in cached.layers]
        if missing:
            raise InvalidRequest(f"the retouch reference of {r.identity} lacks the edited layers {missing[:2]}")
        tokens = subject_positions(self.pipe.models.tokenizer, r.prompt, r.retouch.subject)
        return RetouchWork(cached.path, tokens)

    def _load(self, identity_id: str):
        from pidrt.identity.retouch_reference import ReferenceStore

        references = ReferenceStore(self.store)
        try:  # the file's identity: a rebuilt or deleted entry is read again
            stat = os.stat(references.store.path(identity_id))
            key = (identity_id, stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        cached = references.load(identity_id, self.pipe.layers)
        if key is not None and self.cache_size:
            with self._lock:
                self._cache[key] = cached
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return cached

    def run(self, sampling, jobs: Sequence, specs: Sequence, on_step: Callable[[int, int], None]) -> RetouchOutput:
        """One batch of retouch jobs (one plan); `specs` are the ImageSpecs of their images, in order."""
        per_image = [j for j in jobs for _ in j.request.seeds]
        r0 = jobs[0].request
        retouch_specs = [RetouchSpec(spec, j.retouch.reference, j.retouch.tokens, j.request.retouch.mask)
                         for spec, j in zip(specs, per_image)]
        return retouch(self.pipe, sampling, retouch_specs, r0.retouch.config, r0.retouch.options, on_step=on_step)


def image_extras(request, out, rows: slice) -> list[dict]:
    """Per image of a job (`rows` of the batch): GeneratedImage fields beyond a plain generation's."""
    if request.retouch is None or not isinstance(out, RetouchOutput):
        return [{} for _ in range(rows.stop - rows.start)]
    calls = {**out.unet_calls, "total": sum(out.unet_calls.values())}
    layouts = out.layout_images[rows].detach().float().clamp(0, 1).cpu()
    extras = []
    for pixels in layouts:
        layout = None
        if request.retouch.return_layout:
            array = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            layout = encode_image(array, request.output_format, request.quality)
        extras.append({"layout": layout, "unet_calls": dict(calls)})
    return extras


def check_backend(request, backend: str, blocks: tuple[int, int] | None, lean: bool) -> None:
    """InvalidRequest for a retouch the opened backend cannot run (graph backends: their UNet
    graphs' retouch inputs must cover the plan's layers; the recorded layout path taps torch layers)."""
    from pidrt.runtime.requests import InvalidRequest

    if backend not in ("ort", "trt"):
        return
    c = request.retouch.config
    if blocks is None:
        raise InvalidRequest(f"this {backend} server's UNet graphs take no retouch inputs; start it with --retouch "
                             "to serve mode 'retouch'")
    if not blocks[0] <= c.start_layer < c.end_layer <= blocks[1]:
        raise InvalidRequest(f"the retouch edits blocks {c.start_layer}..{c.end_layer - 1}; this server's graphs "
                             f"edit {blocks[0]}..{blocks[1] - 1}")
    if request.retouch.options.layout == "recorded" and lean:
        raise InvalidRequest(f"layout_path 'recorded' taps the torch UNet's layers, which this lean {backend} server "
                             "does not keep; use layout_path 'inversion' (or start it with --keep-torch-unet)")
