"""Where EAA identity features live during a generation: the three placements of methods.md 3.

- `resident`: every step's K/V on the device before the loop (fastest, most memory: ~2.3 GB an
  identity at 512x512, 50 steps, fp16).
- `streamed`: K/V stay in (pinned) host memory; step i+1 is copied on a side CUDA stream while
  step i runs, so only two steps are on the device.
- `recompute`: no cache. The reference latents P_T ride in the generation's UNet batch and are
  denoised with the caption (the paper's reconstruction pass, in lockstep), and each layer
  projects the reference rows' inputs into K/V on the spot.
All three feed the processors the same K/V, so they give the same images.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pidrt.errors import PidrtError
from pidrt.models.attention import EAARows, LayerInfo, Payload
from pidrt.models.branches import eaa_payloads
from pidrt.models.conditions import EAACondition
from pidrt.runtime.schedulers import DDIM

PLACEMENTS = ("resident", "streamed", "recompute")


class CudaStreams:
    """The CUDA calls of the streamed placement, in one place so a test can record their order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def consumer(self):
        """The stream the UNet call that reads a step's K/V will run on."""
        return torch.cuda.current_stream(self.device)

    def on_side(self):
        return torch.cuda.stream(self.side)

    def record_event(self):
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    @staticmethod
    def pin(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()

    @staticmethod
    def used_on(t: torch.Tensor, stream) -> None:
        t.record_stream(stream)


class CachedFeed:
    """resident / streamed: per-step K/V from the identity artifact.

    Streamed on CUDA, step i+1's K/V are allocated and copied on a side stream while step i
    runs, and handed to the consumer (the current stream) behind an event. Two orderings keep
    that safe with torch's caching allocator, which hands a freed block back to the stream that
    allocated it as soon as Python drops the tensor, without knowing that another stream reads it:

    1. The consumer waits for the copy: `wait_event` on the side stream's event, before the
       payloads are handed out (the UNet call is enqueued after it).
    2. The side stream must not overwrite a step's memory while the consumer may still read it.
       Python frees step i's streamed tensors as soon as `payloads(i)` has enqueued their
       stacking into the batch's payloads, and the GPU runs steps behind the host, so that
       stacking may not have run yet; a later prefetch, which allocates on the side stream,
       would get the very block back and copy another step into it first. `record_stream(consumer)`
       on every handed-out tensor tells the allocator about the consumer: at the free it records
       an event on the consumer stream and reuses the block only once that event has passed,
       i.e. after every read enqueued by then. The side stream's allocations come only from its
       own pool (the allocator pools blocks per stream), so the consumer's other memory never
       reaches a prefetch, and the side stream need not wait for the consumer: the copy of step
       i+1 still overlaps step i.
    """

    rows = 0

    def __init__(self, layers: Sequence[LayerInfo], conditions: Sequence[EAACondition | None], device, dtype,
                 streamed: bool, start: int = 0, streams: CudaStreams | None = None):
        self.layers, self.device, self.dtype = layers, torch.device(device), dtype
        self.streamed = streamed
        if streams is None and streamed and self.device.type == "cuda":
            streams = CudaStreams(self.device)
        self.streams = streams
        self.host = [None if c is None else c.steps for c in conditions]
        if streams is not None:
            self.host = [None if h is None else [{k: tuple(streams.pin(t) for t in kv) for k, kv in s.items()}
                                                 for s in h] for h in self.host]
        self.ready: dict[int, list] = {}
        if not streamed:
            self.resident = [None if h is None else [self._move(s) for s in h] for h in self.host]
        else:
            self._prefetch(start)  # img2img begins at a later step

    def _move(self, step):
        return {k: tuple(t.to(self.device, self.dtype, non_blocking=True) for t in kv) for k, kv in step.items()}

    def _prefetch(self, i: int) -> None:
        if i >= len(next(h for h in self.host if h is not None)):
            return
        if self.streams is None:
            self.ready[i] = [None if h is None else self._move(h[i]) for h in self.host]
            return
        with self.streams.on_side():
            moved = [None if h is None else self._move(h[i]) for h in self.host]
            event = self.streams.record_event()
        self.ready[i] = [moved, event]

    def payloads(self, i: int) -> dict[str, Payload]:
        if not self.streamed:
            return eaa_payloads(self.layers, [None if r is None else r[i] for r in self.resident])
        entry = self.ready.pop(i)
        if self.streams is not None:
            moved, event = entry
            consumer = self.streams.consumer()
            consumer.wait_event(event)  # ordering 1 (class docstring)
            for step in moved:
                for kv in (step or {}).values():
                    for t in kv:
                        self.streams.used_on(t, consumer)  # ordering 2
        else:
            moved = entry
        self._prefetch(i + 1)  # overlaps with this step's UNet call on CUDA
        return eaa_payloads(self.layers, moved)


class RecomputeFeed:
    """recompute: reference rows prepended to the UNet batch; layers project them into K/V."""

    def __init__(self, pipe, conditions: Sequence[EAACondition | None], steps: int):
        present = [c for c in conditions if c is not None]
        if any(c.latents_t is None or c.adapter is None for c in present):
            raise PidrtError("the recompute placement needs the identity's P_T latents and the EAA adapter")
        if len({c.latents_t.shape[0] for c in present}) > 1:
            raise PidrtError("EAA identities in one recompute batch need the same number of references")
        if len({id(c.adapter) for c in present}) > 1:
            raise PidrtError("EAA identities in one batch must share the EAA adapter")
        # One set of reference rows per distinct identity, shared by its CFG halves.
        unique: dict[int, EAACondition] = {}
        for c in present:
            unique.setdefault(id(c), c)
        first_row, self.latents, captions = {}, [], []
        for key, c in unique.items():
            first_row[key] = sum(t.shape[0] for t in self.latents)
            self.latents.append(c.latents_t)
            captions += [c.caption] * c.latents_t.shape[0]
        n_refs = present[0].latents_t.shape[0]
        self.x = torch.cat(self.latents).to(pipe.device, pipe.dtype)
        self.rows = self.x.shape[0]
        # The reference rows themselves run without the branch (their scale is 0).
        self.element_rows = [[] for _ in range(self.rows)] + [
            [] if c is None else list(range(first_row[id(c)], first_row[id(c)] + n_refs)) for c in conditions
        ]
        self.ctx = pipe.encode_text(captions)
        self.sched = DDIM(pipe.models.preset.scheduler, steps)
        adapter = present[0].adapter
        self.static = {
            layer.name: EAARows(self.element_rows, self._weights(adapter, layer, pipe))
            for layer in pipe.layers
        }

    @staticmethod
    def _weights(adapter, layer: LayerInfo, pipe) -> dict[str, torch.Tensor]:
        w = adapter.layers[layer.index]
        conv = lambda t: t.to(pipe.device, pipe.dtype)  # noqa: E731
        out = {"w_k": conv(w["to_k.weight"].t()), "w_v": conv(w["to_v.weight"].t())}
        if layer.kind == "cross":
            out |= {"agg_w": conv(w["agg.weight"]), "agg_b": conv(w["agg.bias"])}
        return out

    def payloads(self, i: int) -> dict[str, Payload]:
        return self.static

    def advance(self, eps_rows: torch.Tensor, i: int) -> None:
        self.x = self.sched.step(eps_rows, i, self.x)


def make_feed(pipe, conditions: Sequence, steps: int, placement: str, scheduler: str, start: int = 0):
    """The feed for a batch's EAA conditions, or None when the batch has no EAA identity.

    `start`: the first step the loop runs (img2img); recompute always begins at step 0."""
    eaa = [c if isinstance(c, EAACondition) else None for c in conditions]
    if all(c is None for c in eaa):
        return None
    if any(c is not None and not isinstance(c, EAACondition) for c in conditions):
        raise PidrtError("one batch runs one identity method; got EAA with SCA/IP-Adapter")
    if placement not in PLACEMENTS:
        raise PidrtError(f"EAA placement must be one of {PLACEMENTS}; got {placement!r}")
    if scheduler != "ddim":
        raise PidrtError(f"EAA features follow the DDIM schedule they were recorded on; use scheduler 'ddim', not {scheduler!r}")
    if placement == "recompute":
        return RecomputeFeed(pipe, eaa, steps)
    for c in eaa:
        if c is not None and len(c.steps) != steps:
            raise PidrtError(
                f"EAA features were recorded for {len(c.steps)} steps; this generation runs {steps}. "
                "Enroll the identity again with the same step count."
            )
    return CachedFeed(pipe.layers, eaa, pipe.device, pipe.dtype, streamed=placement == "streamed", start=start)
