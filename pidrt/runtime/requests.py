"""Generation requests, results, progress events, limits and the errors a caller can get."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch

from pidrt.errors import PidrtError

log = logging.getLogger(__name__)

FORMATS = ("png", "jpeg", "webp")
METHODS = ("sca", "ip", "eaa")
MAX_SEED = 2**63 - 1
TERMINAL = ("done", "error", "cancelled")


# ----------------------------------------------------------------------------------- errors
class GenerationError(PidrtError):
    """Base of the generator's own errors; `status` is the HTTP status the service answers with."""

    status = 500
    kind = "generation_error"


class InvalidRequest(GenerationError):
    status, kind = 400, "invalid_request"


class Overloaded(GenerationError):
    """The queue is full; retry after `retry_after` seconds."""

    status, kind = 429, "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):  # picklable with its hint (Ray ships exceptions between processes)
        return (type(self), (str(self), self.retry_after))


class GenerationTimeout(GenerationError):
    status, kind = 504, "timeout"


class Cancelled(GenerationError):
    status, kind = 499, "cancelled"


class GeneratorClosed(GenerationError):
    status, kind = 503, "closed"


class GenerationFailed(GenerationError):
    """An unexpected error inside the backend (a bug or the device failing), not the request's fault."""

    status, kind = 500, "internal_error"


def error_info(exc: BaseException) -> dict:
    """{type, message, status} of an exception, as events and the HTTP layer report it."""
    from pidrt.identity.store import CorruptEntryError, UnknownIdentityError

    if isinstance(exc, Overloaded):
        return {"type": exc.kind, "message": str(exc), "status": exc.status, "retry_after": exc.retry_after}
    if isinstance(exc, GenerationError):
        return {"type": exc.kind, "message": str(exc), "status": exc.status}
    if isinstance(exc, UnknownIdentityError):
        return {"type": "unknown_identity", "message": str(exc), "status": 404}
    if isinstance(exc, CorruptEntryError):
        return {"type": "corrupt_identity", "message": str(exc), "status": 500}
    if isinstance(exc, PidrtError):
        return {"type": "invalid_request", "message": str(exc), "status": 400}
    return {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}", "status": 500}


# ----------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Defaults:
    """What a request gets for the fields it leaves out."""

    steps: int = 30
    guidance: float = 7.5
    width: int | None = None  # None: the preset's resolution
    height: int | None = None
    scheduler: str = "ddim"
    scale: float = 1.0
    output_format: str = "png"
    quality: int = 95  # jpeg / webp encoder quality


@dataclass(frozen=True)
class Limits:
    """What a request may ask for (larger asks are refused with InvalidRequest)."""

    max_n: int = 8
    max_steps: int = 150
    min_side: int = 64
    max_side: int = 1024
    max_guidance: float = 30.0
    max_scale: float = 4.0
    max_prompt_chars: int = 2000


@dataclass(frozen=True)
class GeneratorConfig:
    max_batch: int = 8  # images (not counting CFG's doubling) that may share UNet calls
    max_wait_ms: float = 25.0  # how long the oldest queued request waits for company
    queue_size: int = 64  # queued requests (not images); more -> Overloaded
    timeout_s: float = 300.0  # per request, from submission to result
    text_cache_size: int = 256  # prompts whose embeddings are kept
    identity_cache_size: int = 32  # identity conditions kept in memory
    # >0: identity artifacts live on the pipeline's device in an LRU of this many MiB, and
    # conditions are rebuilt from it per request instead of being held by the cache above.
    identity_device_mib: int = 0
    folded: bool = True
    eaa_placement: str = "resident"
    enroll_detector: str = "auto"  # face detector backend for enrollment
    encode_workers: int = 1  # threads encoding PNG/JPEG/WebP beside the worker
    defaults: Defaults = field(default_factory=Defaults)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if self.max_batch < 1 or self.queue_size < 1 or self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise PidrtError("generator config needs max_batch >= 1, queue_size >= 1, max_wait_ms >= 0, timeout_s > 0")
        if (self.text_cache_size < 0 or self.identity_cache_size < 0 or self.identity_device_mib < 0
                or self.encode_workers < 1):
            raise PidrtError("generator config needs cache sizes >= 0 and encode_workers >= 1")


# ---------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class GenerationRequest:
    """One request: `n` images of one prompt. None fields take the generator's defaults.

    seed: None (random, reported back), an int (image i gets seed + i) or one seed per image.
    identity: a stored identity id (`sca-…`, `ip-…`, `eaa-…`); `method`, if given, must match it.
    scale / scale_start / scale_end: the identity branch's scale on steps [start, end).
    """

    prompt: str
    negative_prompt: str = ""
    identity: str | None = None
    method: str | None = None
    scale: float | None = None
    scale_start: int = 0
    scale_end: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | Sequence[int] | None = None
    width: int | None = None
    height: int | None = None
    n: int | None = None
    output_format: str | None = None
    quality: int | None = None
    scheduler: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with every default filled in (what actually runs)."""

    prompt: str
    negative_prompt: str
    identity: str | None
    method: str | None
    scale: float
    scale_start: int
    scale_end: int | None
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    width: int
    height: int
    n: int
    output_format: str
    quality: int
    scheduler: str
    timeout_s: float

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys (and compatible methods) may share UNet calls."""
        return (self.width, self.height, self.steps, self.scheduler, float(self.guidance))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d


# ----------------------------------------------------------------------------------- results
@dataclass
class GeneratedImage:
    index: int
    seed: int
    data: bytes  # encoded in `format`
    format: str
    width: int
    height: int
    identity: str | None
    method: str | None
    backend: str
    pixels: torch.Tensor | None = None  # [3, H, W] float32 in [0, 1] on CPU (None once shipped)
    latents: torch.Tensor | None = None  # [C, h, w] float32 on CPU


@dataclass(frozen=True)
class BatchInfo:
    id: int
    images: int  # rows of the batch (all requests together, before CFG doubling)
    requests: int
    method: str | None


@dataclass
class GenerationResult:
    id: str
    created: int  # unix seconds
    request: ResolvedRequest
    images: list[GeneratedImage]
    timings: dict[str, float]  # queue_s, text_encode_s, unet_loop_s, vae_decode_s, encode_s, total_s
    batch: BatchInfo
    backend: str
    replica: str | None = None  # which server process ran it (Ray Serve replica), where that matters

    def without_tensors(self) -> "GenerationResult":
        """A copy without pixel/latent tensors (cheaper to ship between processes)."""
        images = [GeneratedImage(**{**{f.name: getattr(i, f.name) for f in fields(i)}, "pixels": None, "latents": None})
                  for i in self.images]
        return GenerationResult(self.id, self.created, self.request, images, dict(self.timings), self.batch,
                                self.backend, self.replica)


@dataclass(frozen=True)
class Event:
    """Progress of one job: queued, started, step (1-based), then one of done / error / cancelled."""

    type: str
    job_id: str
    seq: int
    time: float
    step: int | None = None
    steps: int | None = None
    data: dict = field(default_factory=dict)  # started: batch; error / cancelled: {type, message, status}
    result: GenerationResult | None = None  # done only

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL
