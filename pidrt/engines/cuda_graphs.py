"""CUDA graph capture of the whole UNet step, one graph per bucket, identities fed as data.

A captured graph replays fixed kernels on fixed addresses. So a bucket owns static buffers for
everything a UNet call reads: the sample, the timestep, the context, the per-element scale and
every tensor of every payload in the `BranchState`. A call copies the new values into them and
replays. The bucket key is (batch, resolution, context shape, dtypes, method signature), where the
method signature is the payload *structure* per layer (type, query source, token count, tensor
shapes and dtypes) - never its values. So every SCA identity of one shape shares one graph, and a
structure the graph was not captured for (another method, token count or batch) gets its own.

What cannot be captured runs eagerly, with the reason counted in `GraphStats.eager`:
- `state.record` set (EAA feature recording appends the inputs of every layer on the host side);
- `EAARows` payloads (the recompute placement indexes rows with Python lists, a host-to-device
  copy that a capture forbids).

The capture/replay mechanism is injectable (`Capturer`): `CudaGraphCapturer` on a GPU,
`EagerCapturer` (replay = run the function again on the static buffers) to test the keying and
buffer logic anywhere.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol

import torch

from pidrt.errors import PidrtError
from pidrt.models.attention import EAAKV, BranchState, EAARows, FoldedLayer, Payload, UnfoldedBranch
from pidrt.models.folded import FoldedBranch

# A capture can fail for a passing reason (another thread syncing the device): retry, then stay eager.
CAPTURE_ATTEMPTS = 3
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_FOLDED_FIELDS = ("a", "b", "score_bias", "out_bias")
_UNFOLDED_FIELDS = ("keys", "values", "w_q", "w_o", "b_o")
_EAA_FIELDS = ("keys", "values")


class NotGraphable(Exception):
    """This call cannot be replayed from a graph; the message is the reason (counted in stats)."""


def _tensor_sig(t: torch.Tensor | None) -> Hashable:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise NotGraphable(f"non-tensor payload field {type(t).__name__}")
    return tuple(t.shape), t.dtype, str(t.device)


def _fields(payload: Payload) -> tuple[tuple, list[torch.Tensor | None]]:
    """(the structural part of a payload, its tensors in a fixed order)."""
    if isinstance(payload, FoldedLayer):
        br = payload.branch
        return ("folded", payload.query, int(br.n_tokens)), [getattr(br, f) for f in _FOLDED_FIELDS]
    if isinstance(payload, UnfoldedBranch):
        return ("unfolded", payload.query), [getattr(payload, f) for f in _UNFOLDED_FIELDS]
    if isinstance(payload, EAAKV):
        return ("eaa",), [payload.keys, payload.values]
    if isinstance(payload, EAARows):
        raise NotGraphable("EAARows payload (recompute placement)")
    raise NotGraphable(f"unknown payload type {type(payload).__name__}")


def _rebuild(payload: Payload, tensors: list[torch.Tensor | None]) -> Payload:
    """A payload of the same structure whose tensors are `tensors` (the static buffers)."""
    if isinstance(payload, FoldedLayer):
        branch = FoldedBranch(*tensors, n_tokens=payload.branch.n_tokens)
        return FoldedLayer(payload.query, branch)
    if isinstance(payload, UnfoldedBranch):
        return UnfoldedBranch(payload.query, **dict(zip(_UNFOLDED_FIELDS, tensors)))
    return EAAKV(*tensors)


def method_signature(state: BranchState) -> tuple:
    """The payload structure of a state, hashable; raises NotGraphable when it cannot be captured."""
    if state.record is not None:
        raise NotGraphable("feature recording (state.record)")
    if state.value_context is not None or state.layer_contexts is not None:
        # The processor reads these from the state, not from a static slot: a replay would read
        # the capture's tensors. Token identities run eagerly until the buckets hold them.
        raise NotGraphable("token-identity contexts (state.value_context / layer_contexts)")
    if state.swap or state.maps is not None:
        # Their indices, slots and masks change every step; a replay would keep the captured ones.
        raise NotGraphable("Layout-and-Retouch edits (state.swap / state.maps)")
    layers = []
    for name in sorted(state.layers):
        head, tensors = _fields(state.layers[name])
        layers.append((name, head, tuple(_tensor_sig(t) for t in tensors)))
    return (
        tuple(layers),
        _tensor_sig(state.scale),
        repr(state.fused),
        bool(state.explicit_attention),
    )


def as_timestep(t, batch: int, device: torch.device) -> torch.Tensor:
    """The timestep as the UNet takes it: a [batch] tensor on `device` (kept for eager calls)."""
    return torch.as_tensor(t, device=device).expand(batch)


@dataclass(frozen=True)
class BucketKey:
    sample: tuple  # shape, dtype
    timestep: torch.dtype
    context: tuple  # shape, dtype
    method: tuple  # method_signature
    device: str


def bucket_key(x: torch.Tensor, t, ctx: torch.Tensor, state: BranchState) -> BucketKey:
    """The bucket a call belongs to; raises NotGraphable with the reason when it has none."""
    t_dtype = t.dtype if isinstance(t, torch.Tensor) else torch.as_tensor(t).dtype
    return BucketKey((tuple(x.shape), x.dtype), t_dtype, (tuple(ctx.shape), ctx.dtype),
                     method_signature(state), str(x.device))


class _Slot:
    """A static buffer and the source it last copied, so an unchanged source is not copied again.

    The source is held by weak reference and identified together with its version counter: a
    pipeline's fixed SCA payloads are the same tensors every step, EAA's are new ones each step.
    """

    __slots__ = ("buf", "src", "version")

    def __init__(self, buf: torch.Tensor):
        self.buf, self.src, self.version = buf, None, -1

    def load(self, src: torch.Tensor) -> bool:
        # Inference-mode tensors have no version counter: always copy them.
        version = -1 if src.is_inference() else src._version
        if version >= 0 and self.src is not None and self.src() is src and version == self.version:
            return False
        self.buf.copy_(src)
        self.src, self.version = weakref.ref(src), version
        return True


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    copies: int = 0  # payload/context tensors copied into static buffers
    copies_skipped: int = 0  # unchanged since the last call of the bucket
    evictions: int = 0
    eager: Counter = field(default_factory=Counter)  # reason -> calls run eagerly

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eager"] = dict(self.eager)
        return d


class Bucket:
    """Static inputs, static output and the replay of one captured UNet step."""

    def __init__(self, key: BucketKey, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, state: BranchState,
                 channels_last: bool):
        self.key = key
        fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
        self.x = torch.empty_like(x, memory_format=fmt)
        self.t = torch.empty(x.shape[0], dtype=t.dtype if isinstance(t, torch.Tensor) else torch.as_tensor(t).dtype,
                             device=x.device)
        self.ctx = _Slot(torch.empty_like(ctx, memory_format=torch.contiguous_format))
        self.scale = None if state.scale is None else torch.empty_like(state.scale, device=x.device)
        self.slots: dict[str, list[_Slot | None]] = {}
        self.layers: dict[str, Payload] = {}
        for name, payload in state.layers.items():
            _, tensors = _fields(payload)
            slots = [None if s is None else _Slot(torch.empty_like(s, memory_format=torch.contiguous_format))
                     for s in tensors]
            self.slots[name] = slots
            self.layers[name] = _rebuild(payload, [None if s is None else s.buf for s in slots])
        self.out: torch.Tensor | None = None
        self.replay: Callable[[], None] | None = None

    def load(self, x: torch.Tensor, t, ctx: torch.Tensor, state: BranchState, stats: GraphStats) -> None:
        self.x.copy_(x)
        _load_timestep(self.t, t)
        if self.scale is not None:
            self.scale.copy_(state.scale)
        pairs = [(self.ctx, ctx)]
        for name, payload in state.layers.items():
            _, tensors = _fields(payload)
            pairs += [(slot, src) for slot, src in zip(self.slots[name], tensors) if slot is not None]
        for slot, src in pairs:
            if slot.load(src):
                stats.copies += 1
            else:
                stats.copies_skipped += 1


def _load_timestep(buf: torch.Tensor, t) -> None:
    # The scheduler hands a 0-dim CPU tensor: fill_ with its value is a kernel argument, whereas
    # copy_ from pageable host memory would synchronise the host with the GPU every step.
    if not isinstance(t, torch.Tensor) or (t.dim() == 0 and t.device.type == "cpu"):
        buf.fill_(t.item() if isinstance(t, torch.Tensor) else t)
    else:
        buf.copy_(t.expand(buf.shape[0]))


class Capturer(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record `fn` (which reads only static buffers); return (replay, the static output)."""


class CudaGraphCapturer:
    """torch.cuda.CUDAGraph capture; all buckets of one pipeline share one memory pool.

    Sharing is safe because buckets replay one at a time on one stream and every bucket's
    static output stays referenced, so a later capture only reuses another's intermediates.
    """

    def __init__(self, device: torch.device, warmup: int = 2):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise PidrtError(f"CUDA graphs need a CUDA device; got {device} "
                             f"(torch.cuda.is_available() = {torch.cuda.is_available()})")
        self.device, self.warmup = device, warmup
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn):
        # Warm-up on a side stream, as torch documents: lazy initialisation (cuBLAS workspaces,
        # Triton compilation, cuDNN plans) must not happen inside the capture.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server may run other GPU work (enrollment) on other threads meanwhile;
        # "global" would make their unsafe calls fail, not just this capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out


class EagerCapturer:
    """A stand-in for CUDA graphs: replay runs `fn` again and writes into the same output tensor.

    `fn` reads only the static buffers, as a graph would, so a value not copied into them shows
    up as a wrong output, exactly as it would on a GPU.
    """

    def __init__(self):
        self.captures = 0

    def capture(self, fn):
        self.captures += 1
        out = fn()

        def replay():
            out.copy_(fn())

        return replay, out


class GraphedUNet:
    """`forward(x, t, ctx)` served from captured graphs, one per bucket (LRU, `max_buckets`).

    forward must read identities only through `state` (the processors' `BranchState`); it is
    called with the bucket's static buffers swapped into the state while capturing.
    """

    def __init__(self, forward: Forward, state: BranchState, capturer: Capturer, *, channels_last: bool = False,
                 max_buckets: int = 8):
        if max_buckets < 1:
            raise PidrtError(f"max_buckets must be >= 1; got {max_buckets}")
        self.forward, self.state, self.capturer = forward, state, capturer
        self.channels_last, self.max_buckets = channels_last, max_buckets
        self.buckets: OrderedDict[BucketKey, Bucket] = OrderedDict()
        self.failed: dict[BucketKey, tuple[str, int]] = {}  # key -> (why its capture raised, attempts)
        self.stats = GraphStats()

    def __call__(self, x: torch.Tensor, t, ctx: torch.Tensor) -> torch.Tensor:
        try:
            key = bucket_key(x, t, ctx, self.state)
        except NotGraphable as why:
            return self._eager(x, t, ctx, str(why))
        reason, attempts = self.failed.get(key, ("", 0))
        if attempts >= CAPTURE_ATTEMPTS:
            return self._eager(x, t, ctx, reason)
        bucket = self.buckets.get(key)
        if bucket is not None:
            self.buckets.move_to_end(key)
            bucket.load(x, t, ctx, self.state, self.stats)
        else:
            bucket = Bucket(key, x, t, ctx, self.state, self.channels_last)
            # Real values before the capture: its warm-up runs compute on them.
            bucket.load(x, t, ctx, self.state, self.stats)
            try:
                bucket.replay, bucket.out = self.capturer.capture(lambda: self._run_static(bucket))
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back, loudly
                reason = f"capture failed: {type(exc).__name__}: {exc}"
                warnings.warn(f"pidrt: UNet step not captured (attempt {attempts + 1} of {CAPTURE_ATTEMPTS}), "
                              f"running eagerly ({reason})", RuntimeWarning, stacklevel=2)
                self.failed[key] = reason, attempts + 1
                return self._eager(x, t, ctx, reason)
            self.failed.pop(key, None)
            self.stats.captures += 1
            self.buckets[key] = bucket
            while len(self.buckets) > self.max_buckets:
                self.buckets.popitem(last=False)
                self.stats.evictions += 1
        bucket.replay()
        self.stats.replays += 1
        return bucket.out.clone(memory_format=torch.contiguous_format)

    def _run_static(self, bucket: Bucket) -> torch.Tensor:
        state = self.state
        saved = state.layers, state.scale
        state.layers, state.scale = bucket.layers, bucket.scale
        try:
            return self.forward(bucket.x, bucket.t, bucket.ctx.buf)
        finally:
            state.layers, state.scale = saved

    def _eager(self, x, t, ctx, reason: str) -> torch.Tensor:
        self.stats.eager[reason] += 1
        out = self.forward(x, as_timestep(t, x.shape[0], x.device), ctx)
        return out.contiguous()

    def reset(self) -> None:
        """Drop every captured graph (e.g. after changing weights in place)."""
        self.buckets.clear()
        self.failed.clear()
