"""Generation requests, results, progress events, limits and the errors a caller can get."""

from __future__ import annotations

import logging
import math
import re
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from pidrt.errors import PidrtError

if TYPE_CHECKING:
    from pidrt.runtime.edit_requests import EditSummary, ResolvedEdit

log = logging.getLogger(__name__)

FORMATS = ("png", "jpeg", "webp")
METHODS = ("sca", "ip", "eaa")
MAX_SEED = 2**63 - 1
TERMINAL = ("done", "error", "cancelled")
# The identity strength a request gets when it names none, per method (methods.md section 5), unless
# the adapter file's `default_scale` says otherwise. SCA: PIDiff's inference lambda (1.0 is its
# training value). EAA: Inv-Adapter gives sigma in [0.6, 1] with no single value; 0.8 is the middle
# of that range, within 0.2 of every setting the paper allows. IP-Adapter: diffusers' default.
PAPER_SCALES = {"sca": 0.4, "eaa": 0.8, "ip": 1.0}


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
    if isinstance(exc, CorruptEntryError):  # the id, not the server's file path
        return {"type": "corrupt_identity", "message": f"stored identity {exc.id} failed verification ({exc.reason})",
                "status": 500}
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
    scale: float | None = None  # None: the identity method's (`method_scales`); 0 without identity
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
    tokens: a stored token identity id (`tokens-…`) whose placeholder the prompt contains; it
    composes with `identity` (docs/token-identities.md).
    scale / scale_start / scale_end: the identity branch's scale on steps [start, end).
    init_image .. inpainting: an edit of a photo (file bytes or a path; pidrt.runtime.edit_requests).
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
    tokens: str | None = None
    # "retouch": Layout-and-Retouch with the fields of `retouch` (pidrt.runtime.retouch_requests)
    mode: str = "generate"
    retouch: object | None = None  # RetouchRequest (or a dict of its fields)
    init_image: bytes | str | None = None  # img2img / inpainting / face restoration (docs/edits.md)
    mask: bytes | str | None = None  # transparent (alpha) or white (no alpha) = repaint
    strength: float | None = None
    restore_face: bool = False
    upscale: float | None = None
    face_only: bool = False
    inpainting: str | None = None  # "blend" | "model"; None: the server's UNet


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
    tokens: str | None = None
    retouch: object | None = None  # ResolvedRetouch for mode "retouch"
    edit: ResolvedEdit | EditSummary | None = None  # a summary once the result is shipped or stored

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys (and compatible methods) may share UNet calls."""
        return (self.width, self.height, self.steps, self.scheduler, float(self.guidance),
                self.retouch.plan_key if self.retouch is not None else None)

    def as_dict(self) -> dict:
        d = asdict(replace(self, edit=None))  # the edit's pixels are not echoed
        d["seeds"] = list(self.seeds)
        d["retouch"] = self.retouch.as_dict() if self.retouch is not None else None
        d["edit"] = None if self.edit is None else self.edit.describe()
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
    layout: bytes | None = None  # retouch with return_layout: the layout image, encoded in `format`
    unet_calls: dict[str, int] | None = None  # retouch: the UNet calls the image's batch made, per part


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
    timings: dict[str, float]  # queue_s, text_encode_s, vae_encode_s, unet_loop_s, vae_decode_s, encode_s, total_s
    batch: BatchInfo
    backend: str
    replica: str | None = None  # which server process ran it (Ray Serve replica), where that matters

    def without_tensors(self) -> "GenerationResult":
        """A copy without pixel/latent tensors (cheaper to ship between processes, and to keep):
        an edit's images are dropped too, its summary kept."""
        images = [GeneratedImage(**{**{f.name: getattr(i, f.name) for f in fields(i)}, "pixels": None, "latents": None})
                  for i in self.images]
        edit = self.request.edit
        request = self.request if edit is None else replace(self.request, edit=edit.summary())
        return GenerationResult(self.id, self.created, request, images, dict(self.timings), self.batch,
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


def method_scales(encoders=None) -> dict[str, float]:
    """Default identity scale per method: the loaded adapter's `default_scale` (its file's
    metadata) where it has one, else PAPER_SCALES. `encoders` has one attribute per method."""
    out = dict(PAPER_SCALES)
    for method in out:
        value = getattr(getattr(encoders, method, None), "default_scale", None)
        if value is not None:
            out[method] = float(value)
    return out


def resolve_request(req: GenerationRequest, config: GeneratorConfig, preset,
                    scales: Mapping[str, float] | None = None,
                    recorded_steps: Callable[[str], int | None] | None = None) -> ResolvedRequest:
    """Validate `req` against the limits and fill in the defaults (InvalidRequest if it is bad).

    scales: the default scale per method (`method_scales`; default PAPER_SCALES).
    recorded_steps(identity): the step count an EAA identity was enrolled for, the default of a
    request that names one and leaves `steps` out (any other count is refused at submission);
    called only then, so it may read the store.
    """
    d, lim = config.defaults, config.limits

    def number(name, value, lo, hi, integer=False):
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
            raise InvalidRequest(f"{name} must be {'an integer' if integer else 'a number'}; got {value!r}")
        if not lo <= value <= hi:
            raise InvalidRequest(f"{name} must be in {lo}..{hi}; got {value}")
        return value

    if not isinstance(req.prompt, str) or not isinstance(req.negative_prompt or "", str):
        raise InvalidRequest("prompt and negative_prompt must be strings")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name) or ""
        if len(text) > lim.max_prompt_chars:
            raise InvalidRequest(f"{name} is {len(text)} characters; the limit is {lim.max_prompt_chars}")
    identity, method = _identity_and_method(req)
    from pidrt.runtime.token_requests import check_identity_field, check_tokens_field

    check_identity_field(identity)
    tokens = check_tokens_field(req.tokens)
    steps = req.steps
    if steps is None:
        recorded = recorded_steps(identity) if method == "eaa" and recorded_steps is not None else None
        steps = d.steps if recorded is None else recorded
    steps = number("steps", steps, 1, lim.max_steps, integer=True)
    guidance = float(number("guidance", d.guidance if req.guidance is None else req.guidance, 0, lim.max_guidance))
    scale = req.scale
    if scale is None and d.scale is not None:
        scale = d.scale
    elif scale is None:  # the method's own strength; no identity, no branch
        scale = (scales or PAPER_SCALES).get(method, 0.0) if method else 0.0
    scale = float(number("scale", scale, 0, lim.max_scale))
    start = number("scale_start", req.scale_start, 0, steps, integer=True)
    end = None if req.scale_end is None else number("scale_end", req.scale_end, start, steps, integer=True)
    side = preset.resolution
    width = d.width or side if req.width is None else req.width
    height = d.height or side if req.height is None else req.height
    multiple = preset.latent_scale
    for name, v in (("width", width), ("height", height)):
        number(name, v, lim.min_side, lim.max_side, integer=True)
        if v % multiple:
            raise InvalidRequest(f"{name} must be a multiple of {multiple}; got {v}")
    scheduler = req.scheduler or d.scheduler
    from pidrt.runtime.schedulers import _SCHEDULERS

    if scheduler not in _SCHEDULERS or scheduler == "ddim_inverse":
        raise InvalidRequest(f"unknown scheduler {scheduler!r}; choose one of "
                             f"{[s for s in _SCHEDULERS if s != 'ddim_inverse']}")
    fmt = (req.output_format or d.output_format).lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in FORMATS:
        raise InvalidRequest(f"output_format must be one of {list(FORMATS)}; got {req.output_format!r}")
    quality = number("quality", d.quality if req.quality is None else req.quality, 0, 100, integer=True)
    timeout = config.timeout_s if req.timeout_s is None else \
        float(number("timeout_s", req.timeout_s, 0.001, config.timeout_s))

    seed = req.seed
    if seed is not None and not isinstance(seed, int) or isinstance(seed, bool):
        if not isinstance(seed, (list, tuple)) or not seed:
            raise InvalidRequest(f"seed must be an integer or a non-empty list of integers; got {seed!r}")
    if isinstance(seed, (list, tuple)):
        n = len(seed) if req.n is None else req.n
        if len(seed) != n:
            raise InvalidRequest(f"{len(seed)} seeds given for n={n} images; give one seed per image")
    else:
        n = 1 if req.n is None else req.n
    number("n", n, 1, lim.max_n, integer=True)
    if seed is None:
        seeds = tuple(secrets.randbits(32) for _ in range(n))
    elif isinstance(seed, (list, tuple)):
        seeds = tuple(number("seed", s, 0, MAX_SEED, integer=True) for s in seed)
    else:
        number("seed", seed, 0, MAX_SEED - n + 1, integer=True)  # the last image's seed is seed + n - 1
        seeds = tuple(seed + i for i in range(n))
    from pidrt.runtime.edit_requests import resolve_edit
    from pidrt.runtime.retouch_requests import resolve_retouch

    if req.mode == "retouch" and req.init_image is not None:
        # Stage 2 swaps in the layout path's own trajectory: it has no place for an init image.
        raise InvalidRequest("mode 'retouch' generates from noise; it takes no init_image (edit the retouched "
                             "image in a second request)")
    retouch = resolve_retouch(req.mode, req.retouch, steps=steps, width=width, height=height, scheduler=scheduler,
                              identity=identity)
    edit = resolve_edit(req, width, height, steps, config.enroll_detector)
    return ResolvedRequest(
        prompt=req.prompt, negative_prompt=req.negative_prompt or "", identity=identity, method=method,
        scale=scale, scale_start=start, scale_end=end, steps=steps, guidance=guidance, seeds=seeds,
        width=width, height=height, n=n, output_format=fmt, quality=quality, scheduler=scheduler,
        timeout_s=timeout, tokens=tokens, retouch=retouch, edit=edit,
    )


def _identity_and_method(req: GenerationRequest) -> tuple[str | None, str | None]:
    """The request's identity and the method it implies (an id names its method)."""
    identity, method = req.identity or None, req.method or None
    if method is not None and method not in METHODS:
        raise InvalidRequest(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if identity is None:
        return None, None  # a method without an identity has nothing to apply
    if not isinstance(identity, str):
        raise InvalidRequest(f"identity must be an id string; got {identity!r}")
    id_method = identity.split("-", 1)[0]
    if method is not None and id_method in METHODS and method != id_method:
        raise InvalidRequest(f"identity {identity} was enrolled with {id_method}, not {method}")
    return identity, id_method
SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WxH' -> (width, height); None or 'auto' -> (None, None): the defaults (HTTP and CLI alike)."""
    if size is None or size == "auto":
        return None, None
    m = SIZE_RE.match(size)
    if not m:
        raise InvalidRequest(f"size must look like '512x512' (width x height) or 'auto'; got {size!r}")
    return int(m.group(1)), int(m.group(2))
