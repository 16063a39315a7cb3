"""What a user chooses about the backend, as one frozen dataclass, and the shape buckets it serves.

`BackendOptions` is what `pidrt serve`, `pidrt generate`, `pidrt bench`, the Ray Serve deployment
and the Python `build_generator` take; `pidrt.engines.choose.open_backend` turns it into the
pipeline the Generator runs. `add_backend_arguments` / `backend_options_from_args` are its CLI edge.

Buckets are the shapes a backend is prepared for: batch sizes (images, before CFG doubles
them) x resolutions, e.g. ``1,2,4,8@512x512``. Start-up warms every bucket; a request at a
resolution outside them is refused (400, naming them), and a batch size between them runs on the
slower path (see `Buckets.check` and docs/serving.md).
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pidrt.errors import PidrtError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "fast", "ort", "trt")
GRAPH_BACKENDS = ("ort", "trt")
METHODS = ("none", "sca", "ip", "eaa")
DEFAULT_BATCHES = (1, 2, 4, 8)
_SPEC = re.compile(r"^\s*(\d+(?:\s*,\s*\d+)*)\s*@\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Bucket:
    """One prepared shape: `batch` images (CFG doubles the UNet batch) of width x height pixels."""

    width: int
    height: int
    batch: int

    def __str__(self) -> str:
        return f"{self.batch}@{self.width}x{self.height}"


@dataclass(frozen=True)
class Buckets:
    buckets: tuple[Bucket, ...]

    def __post_init__(self):
        if not self.buckets:
            raise PidrtError("declare at least one bucket, e.g. 1,2,4,8@512x512")
        bad = [str(b) for b in self.buckets if b.batch < 1 or b.width < 8 or b.height < 8]
        if bad:
            raise PidrtError(f"buckets need batch >= 1 and sides >= 8; got {bad}")
        object.__setattr__(self, "buckets", tuple(sorted(set(self.buckets))))

    @classmethod
    def parse(cls, specs: str | Sequence[str]) -> Buckets:
        """'1,2,4,8@512x512' (several specs separated by spaces or given as a list)."""
        items = specs.split() if isinstance(specs, str) else [s for spec in specs for s in spec.split()]
        out = []
        for spec in items:
            m = _SPEC.match(spec)
            if not m:
                raise PidrtError(f"bucket {spec!r} must look like '1,2,4,8@512x512' (batch sizes @ width x height)")
            width, height = int(m.group(2)), int(m.group(3))
            out += [Bucket(width, height, int(b)) for b in m.group(1).split(",")]
        return cls(tuple(out))

    @classmethod
    def default(cls, resolution: int, max_batch: int) -> Buckets:
        """Powers of two up to max_batch (and max_batch itself) at the preset's resolution."""
        batches = {b for b in DEFAULT_BATCHES if b <= max_batch} | {max_batch}
        return cls(tuple(Bucket(resolution, resolution, b) for b in batches))

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return sorted({(b.width, b.height) for b in self.buckets})

    def batches(self, width: int, height: int) -> list[int]:
        return [b.batch for b in self.buckets if (b.width, b.height) == (width, height)]

    def max_batch(self) -> int:
        return max(b.batch for b in self.buckets)

    def check(self, width: int, height: int, n: int) -> None:
        """Refuse what the prepared engines cannot run: another resolution, or more images than
        the largest bucket of that resolution (InvalidRequest, i.e. HTTP 400, naming the buckets)."""
        from pidrt.runtime.requests import InvalidRequest

        batches = self.batches(width, height)
        if not batches:
            raise InvalidRequest(f"size {width}x{height} is not served here; this server's buckets are {self} "
                                 f"(sizes {', '.join(f'{w}x{h}' for w, h in self.sizes)})")
        if n > max(batches):
            raise InvalidRequest(f"n={n} images at {width}x{height} exceed the largest bucket ({max(batches)}); "
                                 f"this server's buckets are {self}")

    def __str__(self) -> str:
        by_size: dict[tuple[int, int], list[int]] = {}
        for b in self.buckets:
            by_size.setdefault((b.width, b.height), []).append(b.batch)
        return " ".join(f"{','.join(map(str, v))}@{w}x{h}" for (w, h), v in sorted(by_size.items()))


class OffBucketLog:
    """A Generator observer that logs, once per shape, a batch whose size is no declared bucket.

    Such a batch runs, on the slower path: the fast backend captures its CUDA graph then (and
    may evict another), onnxruntime plans the new shape, TensorRT runs it inside the profile.
    """

    def __init__(self, buckets: Buckets, backend: str):
        self.buckets, self.backend = set(buckets.buckets), backend
        self.seen: set[Bucket] = set()

    def on_batch(self, info, jobs) -> None:
        r = jobs[0].request
        shape = Bucket(r.width, r.height, info.images)
        if shape not in self.buckets and shape not in self.seen:
            self.seen.add(shape)
            log.warning("a batch of %s is not a declared bucket: the %s backend runs it on its slower path "
                        "(declare it with --buckets to prepare it at start)", shape, self.backend)


@dataclass(frozen=True)
class BackendOptions:
    """How the UNet, text encoder and VAE run (docs/serving.md, "Backends").

    backend: auto (fast on CUDA, torch on CPU), torch (the reference), fast (CUDA graphs + Triton
      kernels), ort (onnxruntime on exported graphs), trt (TensorRT engines).
    engines: an export folder from `pidrt export` (ort / trt); None: export into `cache_dir`.
    cache_dir: the engine cache (None: $XDG_CACHE_HOME/pidrt/engines or ~/.cache/pidrt/engines).
    buckets: the shapes to prepare and serve; None: the backend's default (docs/serving.md).
    methods: UNet graphs to load (none/sca/ip/eaa); None: none + each method the runtime has an adapter for.
    keep_torch_unet: ort / trt keep the torch models beside the engines (EAA enrollment needs them;
      they cost their memory). False: a lean server, EAA identities come from the shared store.
    threads: onnxruntime intra-op threads (None: its default).
    retouch_blocks: ort / trt: UNet graphs with Layout-and-Retouch inputs for these transformer
      blocks (docs/retouch.md); they serve plain requests too. None: graphs without them (mode
      "retouch" is refused). torch and fast run the retouch without it.
    warmup: run every bucket once at start (False: the first requests pay for it).
    fast: the fast backend's FastTorchConfig (None: its defaults at the runtime's dtype).
    """

    backend: str = "auto"
    engines: Path | None = None
    cache_dir: Path | None = None
    buckets: Buckets | None = None
    methods: tuple[str, ...] | None = None
    keep_torch_unet: bool = False
    threads: int | None = None
    warmup: bool = True
    fast: object | None = field(default=None, compare=False)  # FastTorchConfig (imported lazily: it needs no GPU)
    retouch_blocks: tuple[int, int] | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise PidrtError(f"unknown backend {self.backend!r}; choose one of {list(BACKENDS)}")
        if self.engines is not None and self.backend not in GRAPH_BACKENDS:
            raise PidrtError(f"--engines is an export folder for the ort or trt backend, not {self.backend!r}")
        if self.methods is not None:
            bad = [m for m in self.methods if m not in METHODS]
            if bad or not self.methods:
                raise PidrtError(f"methods must be among {list(METHODS)}; got {list(self.methods)}")
            object.__setattr__(self, "methods", tuple(dict.fromkeys(("none", *self.methods))))
        if self.threads is not None and self.threads < 1:
            raise PidrtError(f"threads must be >= 1; got {self.threads}")


def add_backend_arguments(p) -> None:
    """--backend, --engines, --engine-cache, --buckets, --methods, --keep-torch-unet, --threads."""
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: fast on CUDA, torch on CPU (default: %(default)s)")
    p.add_argument("--engines", type=Path, help="ort/trt: an export folder from `pidrt export` "
                   "(default: export into the engine cache on first start)")
    p.add_argument("--engine-cache", type=Path, help="engine cache folder (default: ~/.cache/pidrt/engines)")
    p.add_argument("--buckets", nargs="+", metavar="B,B@WxH",
                   help="shapes to prepare and serve, e.g. 1,2,4,8@512x512 (default: powers of two up to "
                        "--max-batch at the preset's resolution; torch: any shape)")
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   help="UNet graphs to load (default: none + each method with an adapter)")
    p.add_argument("--keep-torch-unet", action="store_true",
                   help="ort/trt: keep the torch models in memory too, so EAA identities can be enrolled here")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--retouch", action="store_true",
                   help="ort/trt: UNet graphs with Layout-and-Retouch inputs (mode 'retouch'; plain requests too)")
    p.add_argument("--retouch-blocks", type=int, nargs=2, metavar=("START", "END"), default=None,
                   help="with --retouch: the transformer blocks whose self-attention it edits (default: 10 16)")


def backend_options_from_args(a: argparse.Namespace) -> BackendOptions:
    return BackendOptions(backend=a.backend, engines=a.engines, cache_dir=a.engine_cache,
                          buckets=Buckets.parse(a.buckets) if a.buckets else None,
                          methods=tuple(a.methods) if a.methods else None, keep_torch_unet=a.keep_torch_unet,
                          threads=a.threads, retouch_blocks=retouch_blocks(a))


def retouch_blocks(a: argparse.Namespace) -> tuple[int, int] | None:
    """--retouch [--retouch-blocks START END] -> the blocks (MasaCtrl's 10..16 by default), or None."""
    if a.retouch_blocks is not None and not a.retouch:
        raise PidrtError("--retouch-blocks goes with --retouch")
    return (tuple(a.retouch_blocks) if a.retouch_blocks else (10, 16)) if a.retouch else None
